"""Task files: one small YAML file per benchmark, validated into a frozen section chosen by ``kind``.

Paths inside a task file may start with ``{data_root}`` (the suite's data folder, which the user
points at their own copy with ``--data-root``) or ``{probes}`` (the probe files shipped with
tunesmith); other relative paths are relative to the task file's own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from tunesmith.config.base import Regex, Section
from tunesmith.config.loader import read_yaml
from tunesmith.config.stages import StageSection
from tunesmith.core.errors import TunesmithError, missing_file
from tunesmith.evaluation.judge import DEFAULT_RUBRIC

PROBES_DIR = Path(__file__).resolve().parent / "probes"


class TaskBase(Section):
    """Fields every task has."""

    name: str = Field(..., description="Name of the task in results and reports.")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N items (per subject for MMLU).")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass or generation batch.")
    chat_template: bool = Field(
        False, description="Render prompts with the model's chat template (the one saved with the adapter)."
    )


class ChoiceOptions(Section):
    """Options shared by the log-likelihood choice tasks."""

    few_shot: int = Field(0, ge=0, description="Solved examples put before each question.")
    normalisation: Literal["sum", "per_token", "per_char", "per_byte"] = Field(
        "sum", description="Log-likelihood normalisation that decides the prediction (per_char is lm-eval's "
        "acc_norm, per_byte its acc_bytes: divided by the choice's characters or UTF-8 bytes)."
    )
    tokenisation: Literal["joint", "separate"] = Field(
        "joint", description="joint: lm-evaluation-harness 0.4's (context + continuation encoded whole, then split); "
        "separate: each encoded on its own and concatenated after BOS, as training encodes segments."
    )


class MmluTask(TaskBase, ChoiceOptions):
    """MMLU layout: a folder per split of CSV files `question,choice0..3,answer`, one per subject."""

    kind: Literal["mmlu"] = "mmlu"
    path: str = Field(..., description="Folder holding the split folders (e.g. {data_root}/mmlu).")
    split: str = Field("test", description="Split folder scored.")
    few_shot_split: str = Field("dev", description="Split folder the few-shot examples come from.")
    subjects: Optional[tuple[str, ...]] = Field(None, description="Subjects scored (all when omitted).")
    description: str = Field(
        "The following are multiple choice questions (with answers) about {group}.\n\n",
        description="Text before the questions; {group} becomes the subject.",
    )


class MultipleChoiceTask(TaskBase, ChoiceOptions):
    """Generic JSONL multiple choice: one object per line with question, choices and answer index."""

    kind: Literal["multiple_choice"] = "multiple_choice"
    path: str = Field(..., description="JSONL file of items.")
    few_shot_path: Optional[str] = Field(None, description="JSONL file of few-shot examples (default: the items).")
    question_field: str = Field("question", description="Field holding the question.")
    choices_field: str = Field("choices", description="Field holding the list of choices.")
    answer_field: str = Field("answer", description="Field holding the 0-based answer index.")
    group_field: Optional[str] = Field(None, description="Field grouping items for per-group averages.")
    choice_style: Literal["letter", "text"] = Field(
        "letter", description="Score option letters after listing the options, or the choice texts."
    )


class ClassificationTask(TaskBase, ChoiceOptions):
    """Classification by label words: the predicted label is the most likely label word (SST-2 style)."""

    kind: Literal["classification"] = "classification"
    path: str = Field(..., description="TSV, CSV or JSONL file with a text and a label column.")
    text_field: str = Field("sentence", description="Column holding the text.")
    label_field: str = Field("label", description="Column holding the label.")
    label_words: dict[str, str] = Field(..., description="Label value -> the word scored for it.")
    prompt: str = Field("{text}\nSentiment:", description="Prompt; {text} becomes the text.")

    @field_validator("label_words", mode="before")
    @classmethod
    def _labels_as_text(cls, value: object) -> object:
        # YAML reads `0: negative` with an integer key; labels are compared as the file's text.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class FilterStep(Section):
    """One step of an lm-eval filter pipeline (``filter_list[].filter[]`` in an lm-eval task YAML)."""

    function: Literal["regex", "take_first", "remove_whitespace", "lowercase", "uppercase"] = Field(
        ..., description="lm-eval's filter of that name: regex extraction, the first response, strip, lower/upper case.")
    regex_pattern: Regex = Field(r"#### (\-?[0-9\.\,]+)", description="regex: the pattern (lm-eval's default).")
    group_select: int = Field(0, description="regex: which match of findall is kept (-1: the last).")
    fallback: str = Field("[invalid]", description="regex: the answer when nothing matches.")


class FilterPipeline(Section):
    """A named lm-eval filter pipeline (e.g. GSM8K's strict-match and flexible-extract)."""

    name: str = Field(..., description="Metrics of this pipeline are named METRIC@NAME.")
    filter: tuple[FilterStep, ...] = Field(..., min_length=1, description="The steps, applied in order.")


class ExactMatchOptions(Section):
    """lm-eval's exact_match keyword arguments (its HF-evaluate port): applied to prediction and references."""

    regexes_to_ignore: tuple[str, ...] = Field((), description="Each removed (re.sub) from both strings, in order.")
    ignore_case: bool = Field(False, description="Lowercase both strings.")
    ignore_punctuation: bool = Field(False, description="Remove string.punctuation from both.")
    ignore_numbers: bool = Field(False, description="Remove digits from both.")


class GenerationTask(TaskBase):
    """Generation scored against references: summarisation, translation, question answering."""

    kind: Literal["generation"] = "generation"
    path: str = Field(..., description="JSONL file with prompt fields and reference(s).")
    prompt: str = Field("{question}", description="Prompt template; {field} becomes the record's field.")
    reference_field: str = Field("answer", description="Field holding a reference string or a list of them.")
    metrics: tuple[str, ...] = Field(("exact_match",), description="Metric names (see tunesmith.evaluation.metrics).")
    answer_pattern: Optional[str] = Field(
        None, description="Regex whose last match (group 1) is the answer, for accuracy by extraction (GSM8K '#### (\\S+)')."
    )
    few_shot: int = Field(0, ge=0, description="Solved records (the first of few_shot_path or the file) before each prompt.")
    few_shot_path: Optional[str] = Field(None, description="JSONL file of few-shot records.")
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    until: tuple[str, ...] = Field((), description="Stop strings: the reply is cut before the first (lm-eval's until).")
    filter_list: tuple[FilterPipeline, ...] = Field(
        (), description="lm-eval filter pipelines; each metric is reported per pipeline as METRIC@NAME "
        "(none given: the reply as it is, metrics under their plain names).")
    exact_match_options: Optional[ExactMatchOptions] = Field(
        None, description="Score exact_match as lm-eval does with these options (default: whitespace collapsed).")
    rouge_stemmer: bool = Field(False, description="ROUGE with rouge-score's Porter stemmer (lm-eval's summarisation "
                                "tasks, e.g. cnn_dailymail, use it).")


class JudgeSource(Section):
    """Who judges: a local model (alias, folder or run folder) or an OpenAI-compatible endpoint."""

    model: Optional[str] = Field(None, description="A local judge: model alias, hub folder or run folder.")
    endpoint: Optional[str] = Field(None, description="Base URL of an OpenAI-compatible API, e.g. "
                                    "http://127.0.0.1:8000/v1 (tunesmith serve).")
    endpoint_model: str = Field("default", description="The model id sent to the endpoint.")
    method: Literal["generate", "logprob"] = Field(
        "generate", description="generate: the judge writes its verdict, parsed strictly; logprob (local judges): "
        "the most likely verdict symbol after '[['.")
    max_new_tokens: int = Field(256, ge=1, description="Longest verdict text (generate).")

    @model_validator(mode="after")
    def _one_judge(self) -> "JudgeSource":
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("give exactly one of judge.model and judge.endpoint")
        if self.endpoint is not None and self.method == "logprob":
            raise ValueError("method logprob needs a local judge (judge.model); an endpoint gives text only")
        return self


class JudgeTask(TaskBase):
    """A model as judge: the evaluated model's answers against another's (pairwise) or graded 1-10 (single)."""

    kind: Literal["judge"] = "judge"
    mode: Literal["pairwise", "single"] = Field("pairwise", description="pairwise: win rate against `against`; "
                                                "single: a 1-10 grade against the rubric.")
    path: str = Field(..., description="JSONL of questions (MT-Bench/Vicuna layout works: the first of 'turns').")
    question_field: str = Field("question", description="Field holding the question (a list: its first element).")
    judge: JudgeSource = Field(..., description="The judge.")
    against: Optional[str] = Field(None, description="pairwise: the model (alias, folder or run folder) whose answers "
                                   "the evaluated model's are compared with, e.g. the base model.")
    against_answers: Optional[str] = Field(None, description="pairwise: a JSONL file of the other answers instead "
                                           "(field 'answer', one line per question, same order).")
    rubric: str = Field(DEFAULT_RUBRIC, description="single: what the grade judges (in the judge's instructions).")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer generated by the evaluated model.")
    system_prompt: Optional[str] = Field(None, description="System turn before each question (both models).")
    examples: int = Field(3, ge=0, description="Example pairs (or graded answers) shown in the report.")
    resamples: int = Field(1000, ge=10, description="Bootstrap resamples of the confidence interval.")
    seed: int = Field(0, description="Seed of the bootstrap.")

    @model_validator(mode="after")
    def _pairwise_needs_other(self) -> "JudgeTask":
        if self.mode == "pairwise" and (self.against is None) == (self.against_answers is None):
            raise ValueError("pairwise judging needs exactly one of 'against' (a model) and 'against_answers' (a file)")
        return self


class PerplexityTask(TaskBase):
    """Loss and perplexity on a data file in any training format."""

    kind: Literal["perplexity"] = "perplexity"
    path: str = Field(..., description="Data file (any supported training format).")
    format: str = Field("auto", description="Record layout, as data.format in a recipe.")
    max_length: int = Field(512, ge=8, description="Longest token sequence.")


class BiasTask(TaskBase):
    """Counterfactual sentence pairs in the CrowS-Pairs CSV layout."""

    kind: Literal["bias"] = "bias"
    path: str = Field(..., description="CSV with sent_more, sent_less, stereo_antistereo, bias_type.")


class StageTask(TaskBase):
    """Held-out metrics of a training stage (rm, dpo, orpo, simpo, kto, cls), computed by the stage's own code.

    ``tunesmith eval --compare BASE TUNED --data FILE`` builds it from TUNED's manifest; in a task file
    give at least ``path`` and ``stage``.
    """

    kind: Literal["stage"] = "stage"
    path: str = Field(..., description="Preference pairs, KTO-labelled conversations or text/label rows, as the "
                      "stage trains on.")
    stage: StageSection = Field(..., description="The stage section of the recipe (e.g. {kind: dpo, beta: 0.1}).")
    template: str = Field("auto", description="Chat template, as data.template in the recipe.")
    max_length: int = Field(1024, ge=8, description="Longest token sequence, as data.max_length in the recipe.")
    majority_label: Optional[str] = Field(None, description="cls: the training data's majority class (the baseline); "
                                          "default: the majority of this file.")
    reference: Optional[str] = Field(None, description="dpo/kto: the base model the rewards are measured against "
                                     "when the evaluated model has no adapter to switch off (a full fine-tune).")

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_by_name(cls, value: object) -> object:
        return {"kind": value} if isinstance(value, str) else value


class LmEvalTask(TaskBase):
    """Tasks run by lm-evaluation-harness (optional extra `tunesmith[lm-eval]`)."""

    kind: Literal["lm_eval"] = "lm_eval"
    tasks: tuple[str, ...] = Field(..., description="lm-eval task names.")
    include_path: Optional[str] = Field(None, description="Folder of local lm-eval task YAMLs.")
    num_fewshot: Optional[int] = Field(None, ge=0, description="Few-shot count passed to lm-eval.")


TaskSection = Annotated[
    Union[MmluTask, MultipleChoiceTask, ClassificationTask, GenerationTask, PerplexityTask, BiasTask, LmEvalTask,
          StageTask, JudgeTask],
    Field(discriminator="kind"),
]
TASK_KINDS = ("mmlu", "multiple_choice", "classification", "generation", "perplexity", "bias", "lm_eval", "stage",
              "judge")
_TASK_ADAPTER = TypeAdapter(TaskSection)
PATH_FIELDS = ("path", "few_shot_path", "include_path", "against_answers")


def resolve_path(value: str, base_dir: Path, data_root: Optional[Path]) -> str:
    """Expand ``{data_root}``/``{probes}`` and make a relative path relative to ``base_dir``.

    Raises:
        TunesmithError: If ``{data_root}`` is used but no data root is known.
    """
    if "{data_root}" in value:
        if data_root is None:
            raise TunesmithError(f"path '{value}' uses {{data_root}}; give the suite a data_root or pass --data-root")
        value = value.replace("{data_root}", str(data_root))
    value = value.replace("{probes}", str(PROBES_DIR))
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path))


def parse_task(raw: dict, where: str, base_dir: Path, data_root: Optional[Path]) -> TaskSection:
    """Validate one task mapping and resolve its paths.

    Raises:
        TunesmithError: Naming ``where`` and the offending field.
    """
    if not isinstance(raw, dict):
        raise TunesmithError(f"{where}: a task must be a mapping with at least 'name' and 'kind'")
    if raw.get("kind") not in TASK_KINDS:
        raise TunesmithError(f"{where}: task kind {raw.get('kind')!r} is not one of {', '.join(TASK_KINDS)}")
    resolved = {k: (resolve_path(v, base_dir, data_root) if k in PATH_FIELDS and isinstance(v, str) else v)
                for k, v in raw.items()}
    try:
        return _TASK_ADAPTER.validate_python(resolved)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:]) or "task"
        raise TunesmithError(f"{where}: field '{field}': {first['msg']}") from None


def load_task_file(path: Path, data_root: Optional[Path], overrides: Optional[dict] = None) -> TaskSection:
    """Read and validate a task YAML file (``overrides`` replace its fields, e.g. a suite's ``limit``)."""
    if not path.is_file():
        raise missing_file(path, "task file")
    raw = read_yaml(path, "task file")
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    return parse_task(raw, str(path), path.parent, data_root)
