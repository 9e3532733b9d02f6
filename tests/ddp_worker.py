"""Run by tests/test_distributed.py as `python tests/ddp_worker.py OUT`: two real CPU ranks (gloo), started by
Lightning's launcher exactly as train.py starts them. Each rank writes what it saw to OUT/rank<N>.json."""

import importlib.util
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_dit
from tests.test_mar_objective import tiny_mar
from tinyfusion_pl import distributed
from tinyfusion_pl.callbacks import CoOptimizedWeightUpdate, DifferentiableBlockMask
from tinyfusion_pl.data.digits import DigitsDataModule
from tinyfusion_pl.evaluation.digits_classifier import DigitsClassifier
from tinyfusion_pl.evaluation.fid import digits_fid
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.objectives.mar import MaskedAutoregressive
from tinyfusion_pl.stages.common import fit
from tinyfusion_pl.strategies import ddp_strategy


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


def fit_on_digits(module: DiffusionModule, devices: int, batch_size: int, steps: int,
                  callbacks: list[L.Callback] = ()) -> dict[str, torch.Tensor]:
    """`steps` training steps on the digits with `devices` ranks of `batch_size` samples each, through the stages'
    fit (from the seed's fresh state); the trainable weights this rank ends with."""
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=ddp_strategy() if devices > 1 else "auto",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=list(callbacks))
    fit(trainer, module, DigitsDataModule(batch_size=batch_size))
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def tiny_net(family: str) -> torch.nn.Module:
    """A 4-block net of `family` for the digits, with label dropout 0.3 and a gradient for every weight."""
    if family == "diffusers_dit":
        from tinyfusion_pl.models.diffusers import build_diffusers

        net = build_diffusers("dit", depth=4, learn_sigma=True, num_attention_heads=2, attention_head_dim=8,
                              in_channels=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              class_dropout_prob=0.3)
    else:
        net = tiny_dit(depth=4, class_dropout_prob=0.3)
    with torch.no_grad():  # DiT starts with its blocks as identities (adaLN-zero): give every weight a gradient
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return net


BLOCKS = {"dit": "net.blocks", "diffusers_dit": "net.model.transformer_blocks"}


def data_parallel_pruning(devices: int, batch_size: int, family: str = "dit", weight_update: str = "lora",
                          estimator: str = "straight_through") -> dict:
    """Four learnable-pruning steps (gates, a weight update, label dropout) on the digits with `devices` ranks of
    `batch_size` samples each; what rank zero ends with: the gate logits, the trainable weights and the decision."""
    L.seed_everything(0)
    module = DiffusionModule(tiny_net(family), ema_decay=None, lr=1e-3)
    mask = DifferentiableBlockMask(blocks=BLOCKS[family], pattern="1:2", plot=False, estimator=estimator)
    trainable = fit_on_digits(module, devices, batch_size, 4, [mask, CoOptimizedWeightUpdate(method=weight_update)])
    return {
        "gate_logits": [logits.detach().clone() for logits in mask.gates.gate_logits],
        "trainable": trainable,
        "kept_blocks": mask.kept_blocks,
    }


def data_parallel_mar(devices: int, batch_size: int) -> dict:
    """Three steps of MAR's objective (orders, masks, head steps and noise, label drops) on the digits with
    `devices` ranks of `batch_size` samples each; the trainable weights rank zero ends with."""
    L.seed_everything(0)
    module = DiffusionModule(tiny_mar(), objective=MaskedAutoregressive(), ema_decay=None, lr=1e-3)
    return fit_on_digits(module, devices, batch_size, 3)


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

    # data-parallel pruning: two ranks of 8 samples, to compare with one process of 16 (the test runs that)
    runs = {"pruned": data_parallel_pruning(devices=2, batch_size=8), "mar": data_parallel_mar(devices=2, batch_size=8),
            "frozen": data_parallel_pruning(devices=2, batch_size=8, weight_update="frozen"),  # only gates train
            "score_function": data_parallel_pruning(devices=2, batch_size=8, estimator="score_function")}
    if importlib.util.find_spec("diffusers") is not None:  # an optional dependency
        runs["diffusers_dit"] = data_parallel_pruning(devices=2, batch_size=8, family="diffusers_dit")
    if rank == 0:
        for name, run in runs.items():
            torch.save(run, out / f"{name}_two_ranks.pt")

    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
