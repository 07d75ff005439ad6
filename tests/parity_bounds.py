"""Agreement bounds vs vanilla shared by the parity tests (stand-in weights).

- torch network (pipeline exactness): any gap is a pipeline mistake;
- ONNX Runtime network: its last-bit differences from torch flip the random stand-in's near-ties
  through the float16 accumulation. example_ct_sm is 30 slices inside one 112-slice tile, where the
  float16 Gaussian is small and the accumulated logits are coarse: measured 0.9942 there (the torch
  twin gives 1.0), and test_parity.test_onnx_flips_are_near_ties proves those flips are ties.
- ONNX with short-block InstanceNorm statistics (common/model/precise_norm.py): the runtimes' one-pass
  float32 sums were the main source of that drift; with them fixed, OpenVINO fp32 measured 0.99998.
"""
TWIN_MIN = 0.99999
ORT_MIN = 0.997
ORT_MIN_BY_CASE = {"example_ct_sm.nii.gz": 0.99}


def ort_bound(name: str) -> float:
    return ORT_MIN_BY_CASE.get(name, ORT_MIN)


PRECISE_NORM_MIN = 0.9999


def exact_bound(backend_options: dict, name: str) -> float:
    return PRECISE_NORM_MIN if backend_options.get("model") == "precise_norm" else ort_bound(name)
