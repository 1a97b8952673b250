"""What publishing an adapter version costs the engine thread, on the default model. Prints; passes nothing.

A publish happens at a step boundary, inside the interval the streams are waiting on. Measured in
one run on the same learner:

- peft's way, the baseline: `add_adapter` for the new version, copy the learner's weights into it,
  `save_pretrained` of that adapter, and `delete_adapter` of the version that falls out.
- mace's way: copy the learner's weights into a free frozen slot (`Learner.publish`), copy them to
  the CPU (`Learner.version_weights`) and queue the write on the store's writer thread
  (`AdapterStore.write`); the time the writer then takes is printed apart, off the engine thread.

    python benchmarks/publish.py [--model builtin:smollm2] [--versions 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mace.config import load_config
from mace.model.loader import load_model
from mace.train.adapters import AdapterStore, AdapterVersion
from mace.train.learner import LEARNER, Learner, save_adapter

ROOT = Path(__file__).resolve().parents[1]


def peft_publish(learner: Learner, name: str, directory: Path) -> None:
    learner.peft_model.add_adapter(name, learner.lora_config)
    learner._copy_adapter(LEARNER, name)
    learner._freeze_all_but_learner()
    learner.peft_model.save_pretrained(str(directory), selected_adapters=[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--versions", type=int, default=8)
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "default.toml", {"model": {"name": args.model}}, environ={})
    bundle = load_model(config.model, config.cache_dir)
    learner = Learner(bundle.causal_lm, config.train)
    keep = config.train.max_versions_loaded
    with tempfile.TemporaryDirectory() as tmp:
        baseline_ms = []
        for version in range(1, args.versions + 1):
            started = time.perf_counter()
            peft_publish(learner, f"peft{version}", Path(tmp) / "peft")
            if version > keep:
                learner.peft_model.delete_adapter(f"peft{version - keep}")
            baseline_ms.append(1e3 * (time.perf_counter() - started))
        for version in range(max(1, args.versions - keep + 1), args.versions + 1):
            learner.peft_model.delete_adapter(f"peft{version}")

        store = AdapterStore(Path(tmp) / "adapters")
        engine_ms, writer_ms = [], []
        for version in range(1, args.versions + 1):
            started = time.perf_counter()
            learner.publish(version)
            weights = learner.version_weights(version)
            meta = AdapterVersion(version, store.now(), None, None, 0, "benchmark")
            store.write(meta, lambda directory, w=weights: save_adapter(directory, w, learner.lora_config))
            store.set_active(version)
            if version > keep:
                learner.unload_version(version - keep)
            queued = time.perf_counter()
            store.flush()
            engine_ms.append(1e3 * (queued - started))
            writer_ms.append(1e3 * (time.perf_counter() - queued))
        store.close()

    def row(label: str, values: list[float]) -> str:
        return f"| {label} | {statistics.median(values):.1f} | {max(values):.1f} |"

    print(f"# Publishing an adapter version, {args.model}, {args.versions} versions, {keep} kept loaded\n")
    print("| engine thread per publish | median (ms) | max (ms) |")
    print("|---|---|---|")
    print(row("peft add_adapter + copy + save_pretrained + delete_adapter (baseline)", baseline_ms))
    print(row("mace: slot copy + CPU copy + queue the write", engine_ms))
    print(row("mace: the writer thread afterwards (off the engine thread)", writer_ms))
    print(f"\nspeed-up on the engine thread: {statistics.median(baseline_ms) / statistics.median(engine_ms):.0f}x")


if __name__ == "__main__":
    main()
