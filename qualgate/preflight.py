"""Everything a run can check without loading a model, done before the first model load.

`qualgate validate` runs exactly this, so it catches every input-file problem `qualgate run` would:
the optional packages, the model path, layers and stacks, the backend and its options, the golden
(manifest, every array of scores.npz, domain text, noise floor), prompt files, probe text, judge
prompts and benchmark task directories. A mistake is exit 2 before minutes of scoring, not after.
"""

from __future__ import annotations

from pathlib import Path

from qualgate import golden, noise_floor
from qualgate.backends import get_backend
from qualgate.config import Pipeline
from qualgate.errors import ConfigError
from qualgate.jsonl import read_prompt_rows
from qualgate.plan import PlannedStack, plan
from qualgate.requirements import check_installed
from qualgate.stack import Stack


def check_backend(pipeline: Pipeline, stacks: list[Stack], where: str) -> None:
    """Every planned stack can be opened on the pipeline's backend (its layers, its endpoint, its engine
    environment): a mistake is exit 2 before anything runs, not a failure after hours of earlier stacks."""
    try:
        backend = get_backend(pipeline.backend.name, **pipeline.backend.options)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for stack in stacks:
        try:
            backend.check(stack)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _unique_names(planned: list[PlannedStack], where: str) -> None:
    seen: dict[str, tuple[str, ...]] = {}
    for p in planned:
        if p.stack.name in seen:
            raise ConfigError(
                f"{where}: two stacks are named '{p.stack.name}' ({'+'.join(seen[p.stack.name]) or 'baseline'} and "
                f"{'+'.join(p.layer_names) or 'baseline'}); name them apart in stacks[].name"
            )
        seen[p.stack.name] = p.layer_names


def check_golden(pipeline: Pipeline, where: str) -> None:
    """The golden opens whole and belongs to this comparison; the thresholds are above its noise floor."""
    inst = pipeline.instruments.fidelity
    if inst is None:
        return
    golden_dir = Path(inst.golden)
    manifest = golden.read_manifest(golden_dir)
    config = manifest.fidelity_config(
        block_size=inst.block_size, kv_scoring=inst.kv_scoring, kv_block_size=inst.kv_block_size
    )
    text = golden.domain_text(golden_dir, manifest, inst.text)
    golden.load(golden_dir, pipeline.model, text, config, inst.text or manifest.text.get("source"))
    floors = noise_floor.floor_values(golden_dir)
    for metric, tiers in pipeline.gate.items():
        for threshold in (tiers.warn, tiers.fail):
            if threshold is not None:
                noise_floor.check_thresholds({metric: threshold}, floors, f"{where}: gate")


def probe_text_path(pipeline: Pipeline) -> str | None:
    """The text the prefix-cache and speculation probes are cut from: equivalence.probe_text, else the
    fidelity domain text; None without either (or with probes: false)."""
    inst = pipeline.instruments.equivalence
    if inst is None or not inst.probes:
        return None
    if inst.probe_text is not None:
        return inst.probe_text
    fidelity = pipeline.instruments.fidelity
    if fidelity is None:
        return None
    return fidelity.text or golden.read_manifest(Path(fidelity.golden)).text.get("source")


def check_prompts(pipeline: Pipeline, where: str) -> None:
    equivalence, judge = pipeline.instruments.equivalence, pipeline.instruments.judge
    if equivalence is not None:
        owner: dict[str, str] = {}
        for path in equivalence.prompts:
            for number, row in read_prompt_rows(Path(path)):
                prompt_id = str(row.get("id", f"{Path(path).stem}-{number}"))
                if prompt_id in owner and owner[prompt_id] != path:
                    raise ConfigError(
                        f"{where}: prompt id '{prompt_id}' is in both {owner[prompt_id]} and {path}; "
                        "ids must be unique across instruments.equivalence.prompts"
                    )
                owner[prompt_id] = path
        probe = probe_text_path(pipeline)
        if probe is not None:
            golden.read_text_file(probe)
    if judge is not None:
        read_prompt_rows(Path(judge.prompts), "judge prompts")


def check_benchmarks(pipeline: Pipeline, where: str) -> None:
    inst = pipeline.instruments.benchmarks
    if inst is None:
        return
    from qualgate.instruments.benchmarks.run import task_manager

    task_manager(inst, where)  # every include directory indexed, every task found


def preflight(pipeline: Pipeline, where: str) -> list[PlannedStack]:
    """The planned stacks, once everything checkable without a model has been checked."""
    check_installed(pipeline, where)
    pipeline.model.local_path()  # a missing model directory, before any instrument needs it
    planned = plan(pipeline, pipeline.built_layers(where))
    _unique_names(planned, where)
    check_backend(pipeline, [p.stack for p in planned], where)
    check_golden(pipeline, where)
    check_prompts(pipeline, where)
    check_benchmarks(pipeline, where)
    return planned
