"""Run by test_ddp.py: 2 CPU processes (gloo), DNQ callbacks on; each rank saves its params and statistics."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402

from flatq_lightning import dnq_callbacks  # noqa: E402
from tests.callbacks.lm import TinyLM, loaders, trainer  # noqa: E402


def main(out: str) -> None:
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    cbs = dnq_callbacks("w4a4", stats_every=2, seed=5)
    t = trainer(max_epochs=2, callbacks=cbs, accelerator="cpu", devices=2, strategy="ddp")
    t.fit(model, train, val)
    rec = cbs[0]
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "act_var": dict(rec.act_var),
            "act_lo": dict(rec.act_lo),
            "weight_var": dict(rec.weight_var),
            "applied": cbs[1]._applied,
        },
        Path(out) / f"rank{t.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
