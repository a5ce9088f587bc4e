"""KIVI-2 (no dictionaries) on held-out doc 0 under several thread counts, in one process; writes per-position NLL.

Usage: python bench/stability.py TOKENS TAG THREADS  (e.g. 512 native 2,1,2; rerun with
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 and tag avx2 to compare kernel sets)."""
import json, sys, torch
from csrtool.models import load_model
from csrtool.eval import runner, kivi
from csrtool.eval.documents import heldout_documents
tokens = int(sys.argv[1]); tag = sys.argv[2]
m = load_model("smollm2-135m", "cpu", "float32")
ids = heldout_documents(m.tokenizer, 1, tokens)[0].ids
out = []
for th in [int(x) for x in sys.argv[3].split(",")]:
    torch.set_num_threads(th)
    ref = runner.reference_pass(m.model, ids, 64)
    res = runner.method_pass(m.model, ids, kivi.KIVI(2, group=32), ref, 64, 32, sink=4)
    out.append({"threads": th, "cap": torch.backends.cpu.get_cpu_capability(), "ref_ppl": ref.ppl, "kivi2_ppl": res.ppl,
                "dppl": res.ppl / ref.ppl - 1, "ref_nll": ref.nll_pos.tolist(), "kivi_nll": res.nll_pos.tolist()})
    print(tag, th, out[-1]["cap"], repr(ref.ppl), repr(res.ppl), f"{100*out[-1]['dppl']:+.3f}%", flush=True)
json.dump(out, open(f"stability_{tag}.json", "w"))
