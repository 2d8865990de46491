"""Run training/mnist.py on Cloud TPU slices through the gcloud CLI."""
