"""Test tooling: one real vLLM engine (``vllm.LLM``) in a process of its own, driven over stdin.

    python tests/vllm_runner.py --model DIR [--ec JSON]

reads one JSON request per line, ``{"images": [PATH, ...], "max_tokens": N, "uuids": [...]}``
(one prompt per image, all in one ``generate`` call), and answers one line per request (``@@mmcache-test`` and JSON):
``{"tokens": [[id, ...], ...]}``, or ``{"error": "..."}``. It prints ``{"ready": true}`` once the
engine is up. The engine runs on the CPU (``VLLM_CPU_*`` set here), greedy, in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

MARK = "@@mmcache-test "
"""Answers start with it: vLLM's processes print to standard output too."""


def answer(doc: dict) -> None:
    print(MARK + json.dumps(doc), flush=True)


PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ec", default=None, help="ec_transfer_config as JSON")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--engine-args", default=None, help="more vllm.LLM arguments, as JSON")
    args = p.parse_args()

    from PIL import Image
    from vllm import LLM, SamplingParams

    kwargs = json.loads(args.engine_args) if args.engine_args else {}
    if args.ec:
        kwargs["ec_transfer_config"] = json.loads(args.ec)
    llm = LLM(model=args.model, enforce_eager=True, max_model_len=args.max_model_len, dtype=args.dtype,
              limit_mm_per_prompt={"image": 1}, seed=0, **kwargs)
    answer({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            prompts = []
            uuids = req.get("uuids") or [None] * len(req["images"])
            for path, uuid in zip(req["images"], uuids):
                prompt = {"prompt": PROMPT, "multi_modal_data": {"image": Image.open(path).convert("RGB")}}
                if uuid is not None:
                    prompt["multi_modal_uuids"] = {"image": [uuid]}
                prompts.append(prompt)
            outs = llm.generate(prompts, SamplingParams(max_tokens=req.get("max_tokens", 8), temperature=0.0),
                                use_tqdm=False)
            answer({"tokens": [list(o.outputs[0].token_ids) for o in outs]})
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            answer({"error": f"{type(e).__name__}: {e}"})
    del llm


if __name__ == "__main__":
    main()
