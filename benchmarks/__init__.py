"""The benchmarks, run as scripts (`python benchmarks/transfer.py ...`); a package so that tests
import the shapes and digests they share (`from benchmarks.vllm_shaped import ...`)."""
