"""Peak memory of recording a golden and comparing a stack with it, against text length, at a 128k vocabulary.

    python benchmarks/memory_128k.py [--tokens 25000,50000,100000] [--workdir /tmp/qualgate-128k]

The model is the bundled target's architecture (4 layers, hidden 256) with Llama-3's 128,256-token
vocabulary and random weights (seed 0): its output distribution is nearly flat, the worst case for
the top-k and tail sample, and its logits are as wide as a real Llama-3's. The text is the bundled
domain text repeated to length. Each measurement runs in a fresh process and reports its peak RSS
(ru_maxrss): `record` scores the baseline and writes the golden, `compare` scores an 8-bit RTN stack
against it and computes every fidelity metric. The golden's bytes per scored token are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB = 128256

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[5]))
from qualgate import build_stack, golden_record, open_session
from qualgate.golden import open_reference, read_manifest
from qualgate.instruments.fidelity import FidelityConfig, compare_scored, iter_scores
from qualgate.models import ModelSpec
mode, model, text_path, golden = sys.argv[1:5]
text = Path(text_path).read_text()
start = time.perf_counter()
if mode == "record":
    with open_session(build_stack({"path": model})) as session:
        manifest = golden_record.record(session, text, FidelityConfig(), Path(golden))
    out = {"n_tokens": manifest.n_tokens, "n_chunks": manifest.n_chunks, "bytes_per_token": manifest.bytes_per_token}
else:
    config = read_manifest(Path(golden)).fidelity_config()
    chunks, reference = open_reference(Path(golden), ModelSpec(path=model), text, config)
    stack = build_stack({"path": model}, [{"kind": "weight_quant", "method": "rtn", "bits": 8}])
    with open_session(stack) as session, reference.rows() as rows:
        result = compare_scored(iter_scores(session, chunks, config, rows))
    out = {"kl_mean": result.summary["kl_mean"]["value"], "same_top1": result.summary["same_top1"]["value"]}
out["seconds"] = time.perf_counter() - start
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def make_model(directory: Path) -> None:
    """The bundled target's configuration with a 128,256-token vocabulary, random weights, its tokenizer."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from qualgate.fixtures import bundled_model_path

    if (directory / "model.safetensors").is_file():
        return
    source = bundled_model_path("target")
    config = AutoConfig.from_pretrained(source)
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)


def make_text(path: Path, tokens: int) -> None:
    """The domain text repeated until the tokenizer makes `tokens` tokens of it, cut there."""
    from transformers import AutoTokenizer

    from qualgate.fixtures import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("target"))
    base = (REPO / "evals" / "domain" / "cpython_docs_heldout.txt").read_text(encoding="utf-8")
    per_copy = len(tokenizer(base, add_special_tokens=False)["input_ids"])
    text = base * (tokens // per_copy + 1)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    path.write_text(tokenizer.decode(ids), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="25000,50000,100000")
    parser.add_argument("--workdir", default="/tmp/qualgate-128k")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    model = work / "model-128k"
    make_model(model)
    weights_mb = (model / "model.safetensors").stat().st_size / 2**20
    print(f"model: vocabulary {VOCAB}, weights {weights_mb:.0f} MB (float32)", flush=True)
    print(f"{'text tokens':>11} {'scored':>7} {'record peak RSS':>16} {'compare peak RSS':>17} {'golden B/token':>15}")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        text = work / f"text-{tokens}.txt"
        make_text(text, tokens)
        golden = work / f"golden-{tokens}"
        shutil.rmtree(golden, ignore_errors=True)
        results = {}
        for mode in ("record", "compare"):
            command = [sys.executable, "-c", CHILD, mode, str(model), str(text), str(golden), str(args.threads)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r, c = results["record"], results["compare"]
        print(
            f"{tokens:>11,} {r['n_tokens']:>7,} {r['peak_rss_mb']:>13,.0f} MB {c['peak_rss_mb']:>14,.0f} MB "
            f"{r['bytes_per_token']:>15,.0f}   ({r['seconds']:.0f} s + {c['seconds']:.0f} s; "
            f"KL {c['kl_mean']:.2e}, same top-1 {c['same_top1']:.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
