r"""The layer stacks' remat policies (`model.remat`, models/qwen2_5_vl/layers.py), measured.

For each policy, the learner's packed micro-batch forward + backward (benchmarks/learner.py's
step: teacher-forced log-probs and full-vocabulary entropy of every response token,
differentiated w.r.t. every parameter) compiled for this machine: XLA's temporaries, XLA's FLOP
count (the recompute shows there) and the step time. Then the planner's analytic update-step
memory per policy for the paper presets on a v5p-8 slice (ares_jax/aepo/memory.py, the count
tests/plan_test.py checks against XLA), against the chip's HBM with the 15% headroom the
planner asks for.

  python -m benchmarks.remat --iters=1   # the 'small' model, 16 sequences, ~20k tokens (CPU)

(`--iters` and the data come from benchmarks/learner.py's 'cpu' preset.) With libtpu installed
(TPU.md), `--tpu=full,attention` also compiles `paper_3b`'s update step for v5p-8 per listed
policy (about 5 minutes each on two CPU cores) and prints XLA's temporaries beside the planner's:

  PYTHONPATH=<libtpu dir> python -m benchmarks.remat --iters=1 --tpu=full,attention
"""

from __future__ import annotations

import jax
from absl import app, flags

from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl.layers import REMAT_POLICIES
from benchmarks import learner, report

_PLAN = flags.DEFINE_bool("plan", True, "Also the planner's paper_3b/7b update step on v5p-8.")
_TPU = flags.DEFINE_list("tpu", [], "Policies to compile paper_3b's update step for on v5p-8.")
HEADROOM = 0.85  # the planner's fit: at most 85% of a chip's HBM


def measure(cfg, p, prompts, rows, remat: str, iters: int) -> dict:
    compiled, state, lb = learner.compiled_step(cfg, p, prompts, rows, packed=True, remat=remat)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return dict(
        temp=compiled.memory_analysis().temp_size_in_bytes,
        flops=float(cost.get("flops", 0.0)),
        seconds=report.timed(compiled, state, lb, iters=iters),
        tokens=int(lb.inputs.input_ids.size),
    )


def planned() -> list[str]:
    """Rows of the planner's analytic update step per preset and policy on v5p-8."""
    from ares_jax import plan
    from configs import aepo, topologies

    lines = []
    for preset in ("paper_3b", "paper_7b"):
        for remat in REMAT_POLICIES:
            c = aepo.get_config(f"{preset},topology=v5p-8")
            c.model.remat = remat
            r = plan.plan_one(c, topologies.get("v5p-8"), xla=False)
            have, update = r.verdict.have, r.analytic["update"]
            fits = "yes" if update <= HEADROOM * have else "no"
            lines.append(
                f"| {preset} | {remat} | {report.gib(r.items['activations'])} | "
                f"{report.gib(update)} | {update / have:.2f} | {fits} |"
            )
    return lines


def compiled_on_tpu(remat: str) -> str:
    """A row: XLA's memory of paper_3b's update step for v5p-8 under `remat`, and the planner's."""
    from ares_jax import plan
    from ares_jax.aepo import memory
    from ares_jax.parallel import mesh as mesh_lib
    from configs import aepo, topologies

    c = aepo.get_config("paper_3b,topology=v5p-8")
    c.model.remat = remat
    devices, _ = plan.devices_for(topologies.get("v5p-8"))
    x = memory.setup(c, mesh_lib.make_mesh(dict(c.mesh.shape), devices=devices))
    items = memory.analytic_items(x)
    compiled = memory.Compiled.of(memory.lower_update(x).compile())
    return (
        f"| {remat} | {report.gib(compiled.temp)} | {report.gib(compiled.argument)} | "
        f"{report.gib(items['activations'] + items['gradients'])} |"
    )


def main(argv):
    del argv
    p = learner.PRESETS["cpu"]
    cfg = model_config.preset(p["model"])
    prompts, rows, real = learner._data(cfg, p)
    results = {r: measure(cfg, p, prompts, rows, r, learner._ITERS.value) for r in REMAT_POLICIES}
    base = results["none"]
    lines = [
        f"{report.card()}, jax {jax.__version__}; learner micro-batch, packed: {p['rows']} "
        f"sequences of model {p['model']} ({p['dtype']}) in one row of "
        f"{base['tokens']} tokens ({real} real)",
        "",
        "| model.remat | XLA temp | vs none | XLA FLOPs | vs none | step (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {report.gib(r['temp'])} | {r['temp'] / base['temp']:.2f} | "
            f"{r['flops']:.3g} | {r['flops'] / max(base['flops'], 1):.3f} | "
            f"{r['seconds']:.2f} |"
        )
    if _PLAN.value:
        lines += [
            "",
            "Planner (analytic, ares_jax/aepo/memory.py), update step per chip on v5p-8 (95 GiB "
            f"HBM; fits = at most {HEADROOM:.0%}):",
            "",
            "| preset | model.remat | activations | update step | of HBM | fits |",
            "|---|---|---:|---:|---:|---|",
            *planned(),
        ]
    if _TPU.value:
        lines += [
            "",
            "paper_3b update step compiled for v5p-8 (libtpu), per chip:",
            "",
            "| model.remat | XLA temp | arguments | analytic activations + gradients |",
            "|---|---:|---:|---:|",
            *(compiled_on_tpu(r) for r in _TPU.value),
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
