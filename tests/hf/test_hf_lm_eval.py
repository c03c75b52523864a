"""The lm-evaluation-harness CLI (``lm_eval --model hf ... trust_remote_code=True``) on exports
of two families and on a re-saved export, offline, with the repository's tiny task
(tests/hf/lm_eval_task): its accuracy equals the one the library model gives. Needs the
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


def _library_accuracy(run_dir: Path, folder: Path) -> float:
    """The task's accuracy by hand: the choice whose tokens get the highest summed
    log-probability after the context (lm-eval's acc), from the library model."""
    lm = gam.load_pretrained(run_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    right = 0
    for row in rows:
        context = tok(row["context"]).input_ids
        scores = []
        for choice in row["choices"]:
            whole = tok(row["context"] + choice).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = lm(ids)[0][0].log_softmax(-1)  # (T, V)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context),
                                                                         len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return right / len(rows)


def _lm_eval(folder: Path, tmp_path: Path) -> float:
    out = tmp_path / f"results-{folder.name}"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", TASK,
           "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return results["results"][TASK]["acc,none"]


@pytest.mark.parametrize("name", ["gam", "transformer"])
def test_lm_eval_cli_agrees_with_the_library(make_run, tmp_path, name):
    run_dir = make_run(tmp_path, name)
    folder = export_run(run_dir, tmp_path / f"hf-{name}")
    if name == "gam":  # the second hop: a model loaded from the export and saved again
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        resaved = tmp_path / "resaved"
        model.save_pretrained(resaved)
        transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(resaved)
        folder = resaved
    assert _lm_eval(folder, tmp_path) == pytest.approx(_library_accuracy(run_dir, folder))
