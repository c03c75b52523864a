"""The lm-evaluation-harness CLI (``lm_eval --model hf ... trust_remote_code=True``) on exports
of two families and on a re-saved export, offline, with the repository's tiny task
(tests/hf/lm_eval_task): its log-likelihood of every choice equals the library model's (to
1e-3 nats), and so does its accuracy. Needs the
``eval`` extra (lm-eval); skipped without it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import gam  # noqa: E402
from gam.hf.export import export_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tests" / "hf" / "lm_eval_task"
TASK = "gam_tiny_mc"


def _library_scores(run_dir: Path, folder: Path) -> list[list[float]]:
    """Per row, each choice's summed log-probability after the context (what lm-eval's acc
    compares), from the library model."""
    lm = gam.load_pretrained(run_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    scores = []
    for row in rows:
        context = tok(row["context"]).input_ids
        row_scores = []
        for choice in row["choices"]:
            whole = tok(row["context"] + choice).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = lm(ids)[0][0].log_softmax(-1)  # (T, V)
            row_scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context),
                                                                             len(whole))))
        scores.append(row_scores)
    return scores


def _lm_eval(folder: Path, tmp_path: Path) -> tuple[float, list[list[float]]]:
    """lm-eval's accuracy and, per row (by doc_id), its log-likelihood of each choice."""
    out = tmp_path / f"results-{folder.name}"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", TASK,
           "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = sorted((json.loads(line) for f in out.rglob("samples_*.jsonl")
                      for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    scores = [[float(r[0][0] if isinstance(r[0], list) else r[0]) for r in s["filtered_resps"]]
              for s in samples]
    return results["results"][TASK]["acc,none"], scores


# CI runs two families; GAM_LM_EVAL_FAMILIES="all" (every registered name) or a list of names
# runs more (each costs a tiny training run and one lm_eval process).
_ASKED = os.environ.get("GAM_LM_EVAL_FAMILIES", "").split()
NAMES = sorted(gam.MODELS) if _ASKED == ["all"] else (_ASKED or ["gam", "transformer"])


@pytest.mark.parametrize("name", NAMES)
def test_lm_eval_cli_agrees_with_the_library(make_run, tmp_path, name):
    run_dir = make_run(tmp_path, name)
    folder = export_run(run_dir, tmp_path / f"hf-{name}")
    if name == "gam":  # the second hop: a model loaded from the export and saved again
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        resaved = tmp_path / "resaved"
        model.save_pretrained(resaved)
        transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(resaved)
        folder = resaved
    acc, scores = _lm_eval(folder, tmp_path)
    ours = _library_scores(run_dir, folder)
    assert len(scores) == len(ours)
    for row, (theirs, mine) in enumerate(zip(scores, ours, strict=True)):
        assert theirs == pytest.approx(mine, abs=1e-3), f"row {row}"
    right = [max(range(len(m)), key=m.__getitem__) == json.loads(line)["label"]
             for m, line in zip(ours, (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines(),
                                strict=True)]
    assert acc == pytest.approx(sum(right) / len(right))
