"""The "ship or not" block of `tools report ... --evidence ARTIFACT`: one answer from the paired test
of the fine-tuned model against its base and whatever release evidence the run holds.

- gain over the base: exact McNemar on the shared items, the accuracy difference with its 95 %
  interval; when not significant, the items a paired test would need to detect the observed
  difference (Connor 1987, 80 % power, from the observed discordant pairs);
- quantization: the budget the GGUF was chosen under (`tools quantize --budget`, from its manifest)
  or, without one, the quantization table's mean KL per type (stated, not judged);
- memorization: the audit's pass or fail (`tools audit`);
- memory: the bytes the GGUF needs at each recorded context size (its manifest's ``memory``);
- checkpoint: the step `tools train --select-by` kept, with its dev accuracy (stated, not judged).

Ship only when the gain is significant and every judged check passes; "not settled" when the gain
is not significant either way; "do not ship" when the base is better or a check fails.
"""
from __future__ import annotations

from recipes.selection import checkpoint_line
from release.budget import accuracy_line
from tools.artifact import Artifact
from tools.stages import AUDIT, in_family

from .stats import mcnemar_items_needed, paired_diff_ci


def gain(test: dict) -> dict:
    mc, n = test["mcnemar"], test["n_shared"]
    b, c = mc["a_right_b_wrong"], mc["a_wrong_b_right"]
    ci = paired_diff_ci(b, c, n)
    d = test["accuracy_b"] - test["accuracy_a"]
    head = (f"accuracy {100 * test['accuracy_b']:.1f} % vs {100 * test['accuracy_a']:.1f} % on {n} items, "
            f"difference {100 * d:+.1f} points [95 % CI {100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}], "
            f"exact McNemar p = {mc['p']:.3g} ({c} items won, {b} lost)")
    if test["b_beats_a_95"]:
        return {"check": "gain", "status": "pass", "line": f"better than the base: {head}"}
    if mc["p"] < 0.05:
        return {"check": "gain", "status": "fail", "line": f"worse than the base: {head}"}
    need = mcnemar_items_needed(b, c, n)
    more = (f"; about {need} items would settle a difference this size at 95 % (80 % power, from the "
            f"{b + c} discordant pairs)" if need else "; no difference at all was observed, so no number of "
            "items would show one")
    return {"check": "gain", "status": "inconclusive", "line": f"not significant: {head}{more}", "items_needed": need}


def _quant(a: Artifact) -> dict | None:
    e = a.extra
    if a.stage == "gguf" and isinstance(e.get("budget"), dict) and isinstance(e.get("chosen"), dict):
        c = e["chosen"]
        ci = c.get("mean_kl_ci95") or [c.get("mean_kl"), c.get("mean_kl")]
        return {"check": "quantization", "status": "pass",
                "line": f"{c.get('recipe', e.get('file_type'))} within the budget ({e.get('budget_text') or 'none'}): "
                        f"mean KL vs f16 {c['mean_kl']:.4f} [95 % CI {ci[0]:.4f}, {ci[1]:.4f}], "
                        f"{e.get('size_bytes', 0) / 1e6:.1f} MB"
                        + (f"; {accuracy_line(c['accuracy'])}" if c.get("accuracy") else "")}
    if a.stage == "gguf.set" and e.get("table"):
        kls = ", ".join(f"{r['type']} {r['mean_kl']:.4f}" for r in e["table"] if r.get("mean_kl") is not None)
        return {"check": "quantization", "status": "info",
                "line": f"no budget given; mean KL vs f16 on {e.get('tokens_scored')} held-out tokens: {kls}"}
    return None


def _audit(a: Artifact) -> dict | None:
    au = a.extra.get("audit")
    if not in_family(a.stage, AUDIT) or not au:
        return None
    s = au.get("summary", {})
    can = f", largest canary exposure {s['max_exposure_bits']:.1f} bits" if "max_exposure_bits" in s else ""
    base = s.get("extraction_base_rate")
    return {"check": "memorization", "status": "pass" if au.get("passed") else "fail",
            "line": f"audit {'passed' if au.get('passed') else 'FAILED'} on "
                    f"{', '.join(f['name'] for f in au.get('files', []))}: extraction "
                    f"{100 * s.get('extraction_rate', 0):.1f} %" + (f" (base {100 * base:.1f} %)" if base is not None else "")
                    + f", membership AUC {s.get('membership_auc', 0):.3f} {s.get('membership_auc_ci95')}{can}"}


def _memory(a: Artifact) -> dict | None:
    m = a.extra.get("memory")
    if a.stage != "gguf" or not isinstance(m, dict) or not m.get("needed_bytes"):
        return None
    parts = [f"{b / 1e9:.2f} GB at {int(c):,} tokens" for c, b in m["needed_bytes"].items()]
    return {"check": "memory", "status": "info", "line": f"{a.extra.get('file')} runs in {'; '.join(parts)}"}


def _checkpoint(a: Artifact) -> dict | None:
    sel = a.extra.get("selection")
    if a.stage != "train" or not isinstance(sel, dict) or not sel.get("checkpoints"):
        return None
    others = ", ".join(f"step {c['step']} {100 * c['accuracy']:.1f}%" for c in sorted(sel["checkpoints"], key=lambda c: c["step"])
                       if c["step"] != sel["chosen_step"])
    return {"check": "checkpoint", "status": "info", "line": checkpoint_line(sel) + (f"; {others}" if others else "")}


def verdict_block(test: dict, evidence: list[Artifact]) -> dict:
    """{"decision", "checks": [{"check", "status", "line"}...], "items_needed"} of one paired test and the evidence."""
    checks = [gain(test)]
    for fn in (_quant, _audit, _memory, _checkpoint):
        checks += [c for c in (fn(a) for a in evidence) if c]
    statuses = {c["status"] for c in checks}
    decision = ("do not ship" if "fail" in statuses else "not settled" if "inconclusive" in statuses else "ship")
    return {"decision": decision, "checks": checks, "items_needed": checks[0].get("items_needed")}


def verdict_markdown(v: dict) -> list[str]:
    mark = {"pass": "yes", "fail": "NO", "inconclusive": "not settled", "info": "-"}
    L = [f"## Verdict: {v['decision']}", "", "| check | passes | figures |", "|---|---|---|"]
    L += [f"| {c['check']} | {mark[c['status']]} | {c['line']} |" for c in v["checks"]]
    return L + [""]
