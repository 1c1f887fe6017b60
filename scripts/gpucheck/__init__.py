"""The pieces of `make gpu-check` (scripts/gpu_check.py; usage in docs/gpu-check.md).

- common.py   the case model, timers, peak memory, the environment record;
- kernels.py  section "kernels": every selfsup.kernels op on its Triton path vs the float64
              reference, fp32 / bf16 / fp16, odd and production shapes;
- bench.py    section "bench": the same ops timed at the production shapes beside the
              portable path, the naive reference and the ROOFLINE floor;
- train.py    section "train": 20 steps of every method, ViT-S/16 and ResNet-50, bf16;
- report.py   the Markdown report and its JSON twin.

Only public APIs of selfsup are used (selfsup.kernels.*, the Config / resolve / train of
selfsup.engine), so the kernels and the trainer can change underneath.
"""
