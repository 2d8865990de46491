/* XLA FFI handlers around the loops of cpu_loops.c, for jax on a CPU.

   Compiled with cpu_loops.c into one library, against jaxlib's C header
   `xla/ffi/api/c_api.h` (jax.ffi.include_dir()): the packaged libraries
   against the oldest header the supported jax range needs (XLA accepts a
   handler whose API version is at most its own, down to 0.1), a first-use
   build against the installed one. Each handler reports that version
   (`synann_ffi_api_version` tells the loader before it registers them),
   checks its buffers (float32 matrices), reads its scalar attributes and
   calls the loops:

     keras_synann_forward:  (x, kernel) -> s;  attrs chunk, floor, product_floor, threads
     keras_synann_backward: (x, kernel, u) -> (dx, dkernel);  attrs floor, threads
     keras_synann_contract: (p, q, x, kernel) -> out;  attrs slot, power, floor, threads
                            (p, q: the two operands of T_p not left out, in order) */

#include <stdint.h>
#include <string.h>

#include "xla/ffi/api/c_api.h"

/* cpu_loops.c */
void synann_forward(const float *x, const float *w, float *s, int64_t batch,
                    int64_t n_in, int64_t n_out, int64_t chunk, float floor_,
                    float pfloor, int threads);
void synann_backward(const float *x, const float *w, const float *u, float *dx,
                     float *dw, int64_t batch, int64_t n_in, int64_t n_out,
                     float floor_, int threads);

void synann_contract(int slot, int power, const float *pa, const float *pb,
                     const float *pc, const float *x, const float *w, float *out,
                     int64_t batch, int64_t n_in, int64_t n_out, float floor_,
                     int threads);

/* The XLA FFI API version this library was compiled against: {major, minor}. */
void synann_ffi_api_version(int32_t out[2]) {
  out[0] = XLA_FFI_API_MAJOR;
  out[1] = XLA_FFI_API_MINOR;
}

static XLA_FFI_Error *ffi_error(XLA_FFI_CallFrame *frame, const char *message) {
  XLA_FFI_Error_Create_Args args = {XLA_FFI_Error_Create_Args_STRUCT_SIZE, NULL,
                                    message, XLA_FFI_Error_Code_INVALID_ARGUMENT};
  return frame->api->XLA_FFI_Error_Create(&args);
}

/* Answers XLA's metadata query (API version); returns 1 if it was one. */
static int ffi_metadata(XLA_FFI_CallFrame *frame) {
  if (frame->extension_start == NULL ||
      frame->extension_start->type != XLA_FFI_Extension_Metadata)
    return 0;
  XLA_FFI_Metadata_Extension *ext = (XLA_FFI_Metadata_Extension *)frame->extension_start;
  ext->metadata->api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
  ext->metadata->api_version.extension_start = NULL;
  ext->metadata->api_version.major_version = XLA_FFI_API_MAJOR;
  ext->metadata->api_version.minor_version = XLA_FFI_API_MINOR;
  ext->metadata->traits = 0;
  return 1;
}

/* The scalar attribute `name` as a double (0 if absent). */
static double ffi_attr(XLA_FFI_CallFrame *frame, const char *name) {
  for (int64_t k = 0; k < frame->attrs.size; k++) {
    XLA_FFI_ByteSpan *n = frame->attrs.names[k];
    if (frame->attrs.types[k] != XLA_FFI_AttrType_SCALAR || n->len != strlen(name) ||
        memcmp(n->ptr, name, n->len) != 0)
      continue;
    XLA_FFI_Scalar *v = frame->attrs.attrs[k];
    switch (v->dtype) {
      case XLA_FFI_DataType_S32: return *(int32_t *)v->value;
      case XLA_FFI_DataType_S64: return (double)*(int64_t *)v->value;
      case XLA_FFI_DataType_F32: return *(float *)v->value;
      default: return 0.0;
    }
  }
  return 0.0;
}

static XLA_FFI_Buffer *ffi_f32(void *p, int64_t rank) {
  XLA_FFI_Buffer *b = p;
  return b->dtype == XLA_FFI_DataType_F32 && b->rank == rank ? b : NULL;
}

XLA_FFI_Error *synann_ffi_forward(XLA_FFI_CallFrame *frame) {
  if (ffi_metadata(frame) || frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
  if (frame->args.size != 2 || frame->rets.size != 1)
    return ffi_error(frame, "synann forward: expected (x, kernel) -> s");
  XLA_FFI_Buffer *x = ffi_f32(frame->args.args[0], 2), *w = ffi_f32(frame->args.args[1], 2);
  XLA_FFI_Buffer *s = ffi_f32(frame->rets.rets[0], 2);
  if (!x || !w || !s) return ffi_error(frame, "synann forward: float32 matrices only");
  synann_forward(x->data, w->data, s->data, x->dims[0], x->dims[1], w->dims[1],
                 (int64_t)ffi_attr(frame, "chunk"), (float)ffi_attr(frame, "floor"),
                 (float)ffi_attr(frame, "product_floor"), (int)ffi_attr(frame, "threads"));
  return NULL;
}

XLA_FFI_Error *synann_ffi_backward(XLA_FFI_CallFrame *frame) {
  if (ffi_metadata(frame) || frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
  if (frame->args.size != 3 || frame->rets.size != 2)
    return ffi_error(frame, "synann backward: expected (x, kernel, u) -> (dx, dkernel)");
  XLA_FFI_Buffer *x = ffi_f32(frame->args.args[0], 2), *w = ffi_f32(frame->args.args[1], 2);
  XLA_FFI_Buffer *u = ffi_f32(frame->args.args[2], 2);
  XLA_FFI_Buffer *dx = ffi_f32(frame->rets.rets[0], 2), *dw = ffi_f32(frame->rets.rets[1], 2);
  if (!x || !w || !u || !dx || !dw)
    return ffi_error(frame, "synann backward: float32 matrices only");
  synann_backward(x->data, w->data, u->data, dx->data, dw->data, x->dims[0], x->dims[1],
                  w->dims[1], (float)ffi_attr(frame, "floor"), (int)ffi_attr(frame, "threads"));
  return NULL;
}

XLA_FFI_Error *synann_ffi_contract(XLA_FFI_CallFrame *frame) {
  if (ffi_metadata(frame) || frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
  if (frame->args.size != 4 || frame->rets.size != 1)
    return ffi_error(frame, "synann contract: expected (p, q, x, kernel) -> out");
  XLA_FFI_Buffer *p = ffi_f32(frame->args.args[0], 2), *q = ffi_f32(frame->args.args[1], 2);
  XLA_FFI_Buffer *x = ffi_f32(frame->args.args[2], 2), *w = ffi_f32(frame->args.args[3], 2);
  XLA_FFI_Buffer *out = ffi_f32(frame->rets.rets[0], 2);
  if (!p || !q || !x || !w || !out)
    return ffi_error(frame, "synann contract: float32 matrices only");
  int slot = (int)ffi_attr(frame, "slot");
  const float *ops[3] = {NULL, NULL, NULL};
  for (int k = 0, given = 0; k < 3; k++)
    if (k != slot) ops[k] = given++ == 0 ? p->data : q->data;
  synann_contract(slot, (int)ffi_attr(frame, "power"), ops[0], ops[1], ops[2], x->data,
                  w->data, out->data, x->dims[0], x->dims[1], w->dims[1],
                  (float)ffi_attr(frame, "floor"), (int)ffi_attr(frame, "threads"));
  return NULL;
}
