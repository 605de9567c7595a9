"""The request and response shapes of BEI-Bert's /predict_tokens, with their validation.

Strict types: a client that sends `"true"` for a bool or `1` for a text gets a 422 naming the
field, not a silent coercion."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .errors import Empty, Invalid, PayloadTooLarge

#: the most of a client's input (a field name, a value) an error message repeats
ECHO_CHARS = 200

Strategy = Literal["none", "simple", "first", "average", "max"]
#: the aggregation strategies, in API.md's order (the corpus tool's choices too)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
Direction = Literal["right", "left"]


def _lower(value: object) -> object:
    """Strategy and direction names are accepted in any case."""
    return value.lower() if isinstance(value, str) else value


class PredictRequest(BaseModel):
    """POST /predict_tokens body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": [["Apple is looking at buying U.K. startup for $1 billion"]],
                    "truncate": True,
                    "truncation_direction": "Right",
                    "raw_scores": False,
                    "aggregation_strategy": "max",
                }
            ]
        },
    )

    inputs: StrictStr | list[StrictStr | list[StrictStr]] = Field(
        description="Texts: one string, a list of strings, or a list of lists of strings (flattened in order)."
    )
    aggregation_strategy: Annotated[Strategy, BeforeValidator(_lower)] = Field(
        "none", description="none: one item per token; simple/first/average/max: one item per entity."
    )
    raw_scores: StrictBool = Field(False, description="With `none`: every label's raw logit.")
    truncate: StrictBool = Field(False, description="Cut each text to the model's maximum input length.")
    truncation_direction: Annotated[Direction, BeforeValidator(_lower)] = Field(
        "right", description="Which end `truncate` cuts: Right or Left (any case)."
    )

    def texts(self) -> list[str]:
        """The flattened texts, one result list each."""
        if isinstance(self.inputs, str):
            return [self.inputs]
        flat: list[str] = []
        for item in self.inputs:
            if isinstance(item, str):
                flat.append(item)
            else:
                flat.extend(item)
        return flat


class HfParameters(BaseModel):
    """The `parameters` of the Hugging Face token-classification request: the pipeline's own arguments."""

    model_config = ConfigDict(extra="forbid")

    aggregation_strategy: Annotated[Strategy, BeforeValidator(_lower)] | None = Field(
        None, description="As the pipeline's: none (the default), simple, first, average, max."
    )
    ignore_labels: list[StrictStr] | None = Field(
        None, description='Labels (none) or entity groups left out; the pipeline\'s default ["O"].'
    )
    stride: StrictInt | None = Field(
        None,
        description="Read the whole text in windows overlapping by this many tokens (not with none); "
        "without it the text is cut to the model's length, as the pipeline does.",
    )


class HfRequest(BaseModel):
    """POST / body: what `huggingface_hub.InferenceClient.token_classification` sends."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": "Angela Merkel visited Paris.",
                    "parameters": {"aggregation_strategy": "simple"},
                }
            ]
        },
    )

    inputs: StrictStr | list[StrictStr] = Field(description="One text (one list answered) or a list of texts.")
    parameters: HfParameters = Field(default_factory=lambda: HfParameters.model_validate({}))

    @property
    def strategy(self) -> str:
        return self.parameters.aggregation_strategy or "none"

    @property
    def ignore_labels(self) -> frozenset[str]:
        ignore = self.parameters.ignore_labels
        return frozenset(("O",) if ignore is None else ignore)

    def predict_request(self) -> PredictRequest:
        """The same texts as /predict_tokens reads them: cut to the model's length without `stride`, as
        the pipeline cuts them; with it, read whole in windows (their overlap is given to the tokenizer)."""
        return PredictRequest.model_validate(
            {"inputs": self.inputs, "aggregation_strategy": self.strategy, "truncate": self.parameters.stride is None}
        )


class TokenResult(BaseModel):
    """One token (strategy none) or one entity (grouped strategies)."""

    token: str
    token_id: int
    start: int
    end: int
    results: dict[str, float]


PredictResponse = list[list[TokenResult]]


def echo(value: object) -> str:
    """A client's value as an error message repeats it: its repr, cut to ECHO_CHARS characters."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def parse_request(payload: object, max_texts: int) -> PredictRequest:
    """Validate a decoded JSON body; raise Invalid/Empty/PayloadTooLarge naming the field. The texts
    are counted on the raw payload first, so a body of a million items is refused for their number
    before any of them is validated."""
    request = _validated(PredictRequest, payload, max_texts)
    if isinstance(request.inputs, list):
        if not request.inputs:
            raise Empty("inputs: must hold at least one text")
        for i, item in enumerate(request.inputs):
            if isinstance(item, list) and not item:
                raise Invalid(f"inputs[{i}]: an inner list must hold at least one text")
    if request.raw_scores and request.aggregation_strategy != "none":
        raise Invalid(f"raw_scores: only with aggregation_strategy none, not {request.aggregation_strategy!r}")
    return request


def parse_hf_request(payload: object, max_texts: int) -> HfRequest:
    """Validate a Hugging Face token-classification body as parse_request does, and refuse what the
    pipeline refuses: `stride` with strategy none, a negative one (the model's bound is the tokenizer's)."""
    request = _validated(HfRequest, payload, max_texts)
    if isinstance(request.inputs, list) and not request.inputs:
        raise Empty("inputs: must hold at least one text")
    stride = request.parameters.stride
    if stride is not None and request.strategy == "none":
        raise Invalid("parameters.stride: the pipeline reads whole texts only with a strategy other than none")
    if stride is not None and stride < 0:
        raise Invalid(f"parameters.stride: must not be negative, not {stride}")
    return request


Parsed = TypeVar("Parsed", PredictRequest, HfRequest)


def _validated(model: type[Parsed], payload: object, max_texts: int) -> Parsed:
    """`payload` as `model`, its texts counted first (PayloadTooLarge past `max_texts`), else Invalid."""
    count = _count_texts(payload)
    if count > max_texts:
        raise PayloadTooLarge(f"inputs: {count} texts exceed the limit of {max_texts} per request")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise Invalid(_describe(error)) from None


def _count_texts(payload: object) -> int:
    """How many texts `inputs` would flatten to, whatever its items are (each non-list item counts one)."""
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    if not isinstance(inputs, list):
        return 1
    return sum(len(item) if isinstance(item, list) else 1 for item in inputs)


def _describe(error: ValidationError) -> str:
    """The first problems, each as `field.path: message`, e.g. `inputs[0][1]: Input should be a valid string`."""
    messages = []
    for item in error.errors()[:3]:
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif not part.startswith(("str", "list[", "function-")):  # drop union-branch names
                path += ("." if path else "") + part
        if len(path) > ECHO_CHARS:  # an unknown field's name is the client's
            path = path[:ECHO_CHARS] + "..."
        if item["type"] == "literal_error" and path.endswith(("aggregation_strategy", "truncation_direction")):
            allowed = STRATEGIES if path.endswith("aggregation_strategy") else ("Right", "Left")
            messages.append(f"{path}: must be one of {', '.join(allowed)}, not {echo(item['input'])}")
        else:
            messages.append(f"{path or 'body'}: {item['msg'][:ECHO_CHARS]}")
    return "; ".join(dict.fromkeys(messages))
