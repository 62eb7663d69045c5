"""Everything a run can check without loading a model, done before the first model load.

`qualgate validate` runs exactly this, so it catches every input-file problem `qualgate run` would:
the optional packages, the model path, layers and stacks, the backend and its options, the golden
(manifest, every array of scores.npz, domain text, noise floor), prompt files, probe text, judge
prompts and benchmark task directories. A mistake is exit 2 before minutes of scoring, not after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qualgate import golden, noise_floor
from qualgate.backends import get_backend
from qualgate.chunking import Chunk
from qualgate.config import Pipeline
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity import FidelityConfig, TokenScores
from qualgate.jsonl import prompt_id, read_prompt_rows
from qualgate.plan import PlannedStack, plan
from qualgate.requirements import check_installed
from qualgate.stack import Stack
from qualgate.store import file_sha256


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


@dataclass(frozen=True)
class GoldenData:
    """What a run reads from the golden once: its directory, chunking, chunks, reference scores and the
    hash of scores.npz (part of every fidelity record's identity)."""

    directory: Path
    config: FidelityConfig
    chunks: list[Chunk]
    reference: TokenScores
    scores_sha256: str


def load_golden(pipeline: Pipeline) -> GoldenData | None:
    """The golden the fidelity instrument compares with, opened whole and checked against this
    comparison (model files, text, chunking); None without a fidelity instrument."""
    inst = pipeline.instruments.fidelity
    if inst is None:
        return None
    golden_dir = Path(inst.golden)
    manifest = golden.read_manifest(golden_dir)
    config = manifest.fidelity_config(
        block_size=inst.block_size, kv_scoring=inst.kv_scoring, kv_block_size=inst.kv_block_size
    )
    text = golden.domain_text(golden_dir, manifest, inst.text)
    source = inst.text or manifest.text.get("source")
    chunks, reference = golden.load(golden_dir, pipeline.model, text, config, source)
    return GoldenData(golden_dir, config, chunks, reference, file_sha256(golden_dir / golden.SCORES))


def check_golden(pipeline: Pipeline, where: str) -> GoldenData | None:
    """The golden opens whole and belongs to this comparison; the thresholds are above its noise floor."""
    data = load_golden(pipeline)
    if data is None:
        return None
    floors = noise_floor.floor_values(data.directory)
    for metric, tiers in pipeline.gate.items():
        for threshold in (tiers.warn, tiers.fail):
            if threshold is not None:
                noise_floor.check_thresholds({metric: threshold}, floors, f"{where}: gate")
    return data


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
                name = prompt_id(Path(path), number, row)
                if name in owner and owner[name] != path:
                    raise ConfigError(
                        f"{where}: prompt id '{name}' is in both {owner[name]} and {path}; "
                        "ids must be unique across instruments.equivalence.prompts"
                    )
                owner[name] = path
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


@dataclass(frozen=True)
class Checked:
    """What preflight found: the planned stacks, and the golden it opened (the run reuses it)."""

    planned: list[PlannedStack]
    golden: GoldenData | None


def preflight(pipeline: Pipeline, where: str) -> Checked:
    """The planned stacks, once everything checkable without a model has been checked."""
    check_installed(pipeline, where)
    pipeline.model.local_path()  # a missing model directory, before any instrument needs it
    planned = plan(pipeline, pipeline.built_layers(where))
    _unique_names(planned, where)
    check_backend(pipeline, [p.stack for p in planned], where)
    golden_data = check_golden(pipeline, where)
    check_prompts(pipeline, where)
    check_benchmarks(pipeline, where)
    return Checked(planned, golden_data)
