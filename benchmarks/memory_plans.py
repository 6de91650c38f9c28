"""Which engine plan a study of a big Llama would run, from configs alone (no weights).

For Llama-2 7B / 13B / 70B shapes (their config.json's sizes; GQA for 70B), bf16 on disk,
a base + 3 sources, a TIES genome (plus the linear baselines) in ``models.dtype =
"bfloat16"``, evaluation batches of 8 × 512 tokens, on GPUs of 24, 80 and 141 GB: each
plan's bytes on the device (``search.memory``, as ``search validate`` prints them; the
runtime lives in host memory) and the plan ``search start`` would choose (none: the study is
refused before loading, with the numbers). Prints a Markdown table, then one JSON line::

    python -m benchmarks.memory_plans
"""

from __future__ import annotations

import json

from benchmarks.merge_speed import Size, llama_shapes
from search.memory import ENGINE_PLANS, GIB, estimate_from_shape, shape_from_headers

CONFIGS = {  # the sizes of each model's config.json
    "llama-7b": Size(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, storage="bfloat16"),
    "llama-13b": Size(hidden=5120, intermediate=13824, layers=40, heads=40, vocab=32000, storage="bfloat16"),
    "llama-70b": Size(hidden=8192, intermediate=28672, layers=80, heads=64, vocab=32000, kv_heads=8,
                      storage="bfloat16"),
}
DEVICES_GB = (24, 80, 141)  # an RTX 4090 / L4-class card, an A100 / H100 80 GB, an H200
N_SOURCES = 3
DTYPE = "bfloat16"
METHODS = ("linear", "ties")
BATCH_SIZE = 8
SEQ_LEN = 512


def dry_run() -> list[dict[str, object]]:
    """One row per model and device: each plan's GiB on the device and the chosen plan."""
    rows: list[dict[str, object]] = []
    for model, size in CONFIGS.items():
        shapes = llama_shapes(size)
        config = {"hidden_size": size.hidden, "intermediate_size": size.intermediate, "vocab_size": size.vocab,
                  "max_position_embeddings": 4096}
        shape = shape_from_headers(model, shapes, dict.fromkeys(shapes, "BF16"), config, dtype=DTYPE)
        estimates = [estimate_from_shape(shape, n_sources=N_SOURCES, dtype=DTYPE, batch_size=BATCH_SIZE,
                                         seq_len=SEQ_LEN, methods=METHODS, plan=plan, device="cuda")
                     for plan in ENGINE_PLANS]
        on_device = {e.plan: e.total - e.runtime for e in estimates}
        for device_gb in DEVICES_GB:
            chosen = next((plan for plan in ENGINE_PLANS if on_device[plan] <= device_gb * 10**9), None)
            rows.append({"model": model, "params_b": round(shape.numel / 1e9, 2), "device_gb": device_gb,
                         **{f"{plan}_gib": round(on_device[plan] / GIB, 1) for plan in ENGINE_PLANS},
                         "largest_tensor": shape.largest_name, "plan": chosen})
    return rows


def main() -> int:
    rows = dry_run()
    print("| model | params | GPU | " + " | ".join(f"{plan} plan" for plan in ENGINE_PLANS) + " | chosen |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in ENGINE_PLANS) + " | --- |")
    for row in rows:
        cells = " | ".join(f"{row[f'{plan}_gib']} GiB" for plan in ENGINE_PLANS)
        print(f"| {row['model']} + {N_SOURCES} | {row['params_b']}B | {row['device_gb']} GB | {cells} | "
              f"{row['plan'] or 'none fits: refused before loading'} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
