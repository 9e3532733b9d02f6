"""Run by tests/test_distributed.py as `python tests/ddp_worker.py OUT`: two real CPU ranks (gloo), started by
Lightning's launcher exactly as train.py starts them. Each rank writes what it saw to OUT/rank<N>.json."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_dit
from tinyfusion_pl import distributed
from tinyfusion_pl.evaluation.digits_classifier import DigitsClassifier
from tinyfusion_pl.evaluation.fid import digits_fid
from tinyfusion_pl.module import DiffusionModule


def append_line(path: Path, text: str) -> int:
    with open(path, "a") as handle:
        handle.write(text + "\n")
    return distributed.global_rank()


def fid_case() -> tuple:
    """A digits FID scorer with its reference set, and 30 samples: the same on every rank and in the test."""
    torch.manual_seed(0)
    classifier = DigitsClassifier(8).eval()
    generator = torch.Generator().manual_seed(1)
    reference = torch.randint(0, 256, (40, 8, 8, 1), dtype=torch.uint8, generator=generator)
    samples = torch.randint(0, 200, (30, 8, 8, 1), dtype=torch.uint8, generator=generator)
    scorer = digits_fid(classifier, 8)
    scorer.set_reference(reference)
    return scorer, samples


def main(out: Path) -> None:
    torch.set_num_threads(1)
    processes = distributed.start_processes("cpu", 2)
    rank = processes.global_rank
    seen: dict = {"world_size": distributed.world_size()}

    # once-only work: rank zero runs it, every rank gets its result
    seen["once_result"] = distributed.on_rank_zero(append_line, out / "once.txt", "written")
    try:
        distributed.on_rank_zero(lambda: 1 / 0)
    except (ZeroDivisionError, RuntimeError) as error:
        seen["zero_error"] = f"{type(error).__name__}: {error}"

    # a decision that differs between ranks stops every rank
    try:
        distributed.check_same_on_every_rank([0, 1, rank], "The test decision")
    except RuntimeError as error:
        seen["mismatch"] = str(error)
    distributed.check_same_on_every_rank([0, 1], "An agreed decision")

    # shares of items in whole units, gathered back in order
    start, stop = distributed.share(10, 3)
    seen["share"] = [start, stop]
    seen["gathered"] = distributed.gather_shares(torch.arange(start, stop)).tolist()

    # FID over the ranks' shares (torchmetrics' sync) against the whole reference set
    scorer, samples = fid_case()
    first, last = distributed.share(len(samples), 8)
    seen["fid"] = scorer.score(samples[first:last])

    # a non-finite loss on one rank only: every rank skips that step, and the weights stay equal
    L.seed_everything(0)
    images = torch.randn(8, 1, 8, 8)
    images[3] = float("nan")  # the unshuffled DistributedSampler gives rank 1 indices 1, 3, 5, 7: its second step
    loader = DataLoader(TensorDataset(images, torch.arange(8) % 10), batch_size=1)
    module = DiffusionModule(tiny_dit(depth=1), ema_decay=None, skip_nonfinite_steps=True, lr=1e-2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    seen["nonfinite_steps"] = module.nonfinite_steps
    seen["attempted_steps"] = module.attempted_steps
    seen["weights_sum"] = float(sum(p.double().sum() for p in module.net.parameters()))
    seen["weights_finite"] = all(bool(torch.isfinite(p).all()) for p in module.net.parameters())

    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
