"""The constants every implementation of `log_inhibition` shares.

    s[b, i] = sum over chunks of log(max(prod_j max(1 - W[j, i] x[b, j], FACTOR_FLOOR),
                                         PRODUCT_FLOOR))

A leaf module: it imports nothing, so any module may import it.
"""

#: Smallest value a factor (1 - beta_ij * x_j) may take. Factors below it are
#: raised to it (and pass no gradient), so logs and reciprocals stay finite.
FACTOR_FLOOR = 1e-6
#: Smallest partial product kept before its log is taken (float32's smallest
#: normal number). Below it the output is 0 to float32 precision anyway.
PRODUCT_FLOOR = 1.1754944e-38
#: Inputs are processed in chunks of this many input units: memory is
#: O(chunk * batch * n_out), never batch * n_in * n_out.
DEFAULT_CHUNK_SIZE = 16
