"""The bodies of the server's requests (cllm.server) as pydantic models: the fields each route accepts, their
types, ranges and defaults.

The rules, the same for every model here (they all derive from RequestModel):

- an unknown field is refused (extra="forbid"), in a nested object too;
- types are strict: a string where a number is wanted is refused, and a boolean is not an integer; but a float
  with an integer value (16.0) is an integer (Integer), since JSON has only numbers;
- null is the same as leaving a field out, as in OpenAI's API: the field takes its default, or is missing;
- an OpenAI option that cllm does not implement is accepted only at the value that changes nothing (`only`).
  Implementing one means giving its field a real type and range instead.

Sampling's ranges are cllm.generate.Sampling's own bounds (MAX_TEMPERATURE and the others), so that a request this
schema accepts never fails in the engine, and the other way round.

Limits that depend on the server (the most inputs in one request, the largest max_tokens, the model's embedding
size) come as validation context: `EmbeddingsRequest.model_validate(document, context=Limits(...))`. A limit
that the context leaves out (or no context) is not checked.

Errors are pydantic's. The checks defined here raise PydanticCustomError with a message that is the rest of a
sentence starting with the field's name ("must be ..., got ..."): cllm.server.bodies.request_error words pydantic's own
error types the same way, and turns the first error into the server's 400.
"""
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, TypeAdapter,
                      ValidationError, ValidationInfo, WrapValidator, field_validator, model_validator)
from pydantic_core import PydanticCustomError, PydanticKnownError
from pydantic_core.core_schema import ErrorType, ValidatorFunctionWrapHandler

from .chat import ROLES, message_text, template_kwargs
from .errors import UsageError
from .generate import MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MAX_TOP_K, MAX_TOP_LOGPROBS
from .pooling import POOLINGS
from .tool_calls import TOOL_CHOICES, ToolCalling, tool_calling

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 64  # each stop string is looked for at every token: long ones would cost time on every token
MAX_SEED = 2**63 - 1  # OpenAI's seeds are int64; numpy's generators take any non-negative integer
MAX_PROMPTS = 16  # prompts in one completions request
MAX_CHOICES = 16  # n times the prompts: each choice takes a decoder row
MAX_TOOLS = 128  # tools in one request (as OpenAI), and tool calls in one message
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for a tool's name
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs' names: a template reads a few


@dataclass(frozen=True)
class Limits:
    """The server's limits on a request, passed as validation context. None: not checked."""

    max_embedding_inputs: int | None = None  # texts in one embeddings (or TEI tokenize) request
    max_completion_tokens: int | None = None  # the largest max_tokens
    dim: int | None = None  # the model's embedding size, the only `dimensions` it can give
    vocab_size: int | None = None  # the tokenizer's: a prompt's token ids are below it


def limit(info: ValidationInfo, name: str) -> int | None:
    return getattr(info.context, name, None)


def short_repr(value, limit: int = 40) -> str:
    """JSON for value, cut short: an error message must not echo a megabyte back."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# field types


def integral_float(value):
    """16.0 -> 16: JSON has numbers, not integers and floats, and some clients write every number with a point."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(integral_float)]


def only(neutral) -> AfterValidator:
    """An OpenAI option that cllm does not implement, accepted only at the value that changes nothing:
    `n: Annotated[Any, only(1)] = 1`."""

    def check(value):
        if value == neutral and isinstance(value, bool) == isinstance(neutral, bool):
            return value
        raise PydanticCustomError("unsupported", "is not supported by this server (only {neutral})",
                                  {"neutral": json.dumps(neutral)})

    return AfterValidator(check)


PYDANTIC_ERRORS = frozenset(get_args(ErrorType))


def as_list_of_one(value, handler: ValidatorFunctionWrapHandler):
    """handler([value]), with errors located at the field itself rather than at item 0 of a list the client
    never sent."""
    try:
        return handler([value])
    except ValidationError as error:
        details = []
        for detail in error.errors(include_url=False):
            kind = detail["type"]
            moved = {"type": kind if kind in PYDANTIC_ERRORS else PydanticCustomError(kind, detail["msg"]),
                     "loc": detail["loc"][1:], "input": detail["input"]}
            if "ctx" in detail and kind in PYDANTIC_ERRORS:
                moved["ctx"] = detail["ctx"]
            details.append(moved)
        raise ValidationError.from_exception_data(error.title, details) from None


def one_or_many_texts(value, handler: ValidatorFunctionWrapHandler):
    """A string, or a list of strings: a string is a list of one."""
    if isinstance(value, str):
        return as_list_of_one(value, handler)
    if isinstance(value, list) and all(isinstance(text, str) for text in value):
        return handler(value)
    raise PydanticCustomError("texts_type", "must be a string or a list of strings (token-id arrays are not "
                              "supported), got {given}", {"given": short_repr(value)})


def check_stop_string(text: str) -> str:
    if len(text) > MAX_STOP_CHARS:
        raise PydanticCustomError("stop_too_long", "is {length} characters long; a stop string may have at most "
                                  "{most}", {"length": len(text), "most": MAX_STOP_CHARS})
    return text


Text = Annotated[str, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1), WrapValidator(one_or_many_texts)]
StopStrings = Annotated[list[Annotated[Text, AfterValidator(check_stop_string)]],
                        Field(min_length=1, max_length=MAX_STOP_STRINGS), WrapValidator(one_or_many_texts)]


def within_max_inputs(texts: list[str], info: ValidationInfo) -> list[str]:
    most = limit(info, "max_embedding_inputs")
    if most is not None and len(texts) > most:
        raise PydanticKnownError("too_long", {"field_type": "List", "max_length": most,
                                              "actual_length": len(texts)})
    return texts


def within_batch_size(texts: list[str], info: ValidationInfo) -> list[str]:
    """TEI's inputs: too many is its own error type, which the server answers with 413, as TEI does."""
    most = limit(info, "max_embedding_inputs")
    if most is not None and len(texts) > most:
        raise PydanticCustomError("batch_too_large", "must hold at most {most} items, got {count}",
                                  {"most": most, "count": len(texts)})
    return texts


def within_max_completion_tokens(value: int, info: ValidationInfo) -> int:
    most = limit(info, "max_completion_tokens")
    if most is not None and value > most:
        raise PydanticKnownError("less_than_equal", {"le": most})
    return value


def model_dimensions(value: int, info: ValidationInfo) -> int:
    # OpenAI's newer models can shorten their embeddings; cllm's were not trained to keep meaning when cut.
    dim = limit(info, "dim")
    if dim is not None and value != dim:
        raise PydanticCustomError("dimensions", "must be {dim}, the size of this model's embeddings, got {given}",
                                  {"dim": dim, "given": short_repr(value)})
    return value


Dimensions = Annotated[Integer, AfterValidator(model_dimensions)]


def one_prompt(value):
    """A prompt: a string, or a list of one string (what OpenAI's clients send for a batch of one)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, str):
        return value
    raise PydanticCustomError("prompt_type", "must be a string or a list of one string (batches and token-id "
                              "arrays are not supported), got {given}", {"given": short_repr(value)})


Prompt = Annotated[str, BeforeValidator(one_prompt)]

TokenId = Annotated[Integer, Field(ge=0)]


def token_id_list(value, handler: ValidatorFunctionWrapHandler):
    if not isinstance(value, list):
        raise PydanticCustomError("token_ids_type", "must be a list of token ids, got {given}",
                                  {"given": short_repr(value)})
    return handler(value)


def one_or_many_token_lists(value, handler: ValidatorFunctionWrapHandler):
    """A list of token ids, or a list of such lists: one list is a list of one."""
    if isinstance(value, list) and value and all(isinstance(ids, list) for ids in value):
        return handler(value)
    if isinstance(value, list):
        return as_list_of_one(value, handler)
    raise PydanticCustomError("token_ids_type", "must be a list of token ids or a list of such lists, got "
                              "{given}", {"given": short_repr(value)})


TokenIds = Annotated[list[TokenId], WrapValidator(token_id_list)]
TokenIdLists = Annotated[list[list[TokenId]], WrapValidator(one_or_many_token_lists)]


# --------------------------------------------------------------------------------------------------------------
# the requests


class RequestModel(BaseModel):
    """A JSON object in a request: unknown fields refused, types strict, null the same as absent."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def null_is_absent(cls, data):
        if isinstance(data, dict):  # anything else is refused by the model itself
            return {name: value for name, value in data.items() if value is not None or name not in cls.model_fields}
        return data


class EmbeddingsRequest(RequestModel):
    """POST /v1/embeddings"""

    model: str
    input: Annotated[Texts, AfterValidator(within_max_inputs)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None  # None: the model's own
    user: str = ""  # accepted for compatibility; nothing to do with it
    # Extensions, as TEI names them: the pooling (None: the server's --pooling), and truncation of a text longer
    # than max_input_tokens to its first max_input_tokens tokens (else such a text is refused).
    pooling: Literal[POOLINGS] | None = None
    truncate: bool = False
    # Extensions: the prompt put before each input, named (as TEI's prompt_name) or given whole (as
    # sentence-transformers' encode(prompt=...); not "prompt", which is a completion's text in OpenAI's API).
    prompt_name: str | None = None
    prompt_text: str | None = None

    @model_validator(mode="after")
    def one_prompt_at_most(self):
        if self.prompt_name is not None and self.prompt_text is not None:
            raise PydanticCustomError("two_prompts", "give 'prompt_name' or 'prompt_text', not both")
        return self


class StreamOptions(RequestModel):
    include_usage: bool = False
    # Pads chunks against length side channels on OpenAI's side; here it changes nothing.
    include_obfuscation: bool = False


class GenerationRequest(RequestModel):
    """What completions and chat completions share: the model, the length, sampling, stopping and streaming."""

    model: str
    max_tokens: Annotated[Integer, Field(ge=1), AfterValidator(within_max_completion_tokens)] = 16  # as OpenAI
    # Below cllm.generate.GREEDY_TEMPERATURE (1e-5), sampling is greedy, as at 0.
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[Integer, Field(ge=1, le=MAX_TOP_K)] | None = None  # an extension; past the vocabulary: all
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # an extension, as vLLM's and llama.cpp's
    presence_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY)] = 1.0  # an extension, as vLLM's
    seed: Annotated[Integer, Field(ge=0, le=MAX_SEED)] | None = None
    n: Annotated[Integer, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: StopStrings = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    user: str = ""  # accepted for compatibility; nothing to do with it
    # OpenAI's options that cllm does not implement, accepted at the values that change nothing
    logit_bias: Annotated[Any, only({})] = Field(default_factory=dict)

    @field_validator("stream_options")
    @classmethod
    def usage_only_when_streaming(cls, options: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if options.include_usage and not info.data.get("stream", False):
            raise PydanticCustomError("stream_options_without_stream", "is only allowed when 'stream' is true")
        return options

    @model_validator(mode="after")
    def default_length_within_limit(self, info: ValidationInfo):
        # Pydantic does not validate defaults: a server whose limit is 4 would give a body without max_tokens 16,
        # yet refuse an explicit 16. The default is cut to the limit instead, as a default should never be refused;
        # it stays out of model_fields_set, still a default.
        most = limit(info, "max_completion_tokens")
        if most is not None and "max_tokens" not in self.model_fields_set:
            self.__dict__["max_tokens"] = min(self.max_tokens, most)
        return self

    def sampling(self) -> dict:
        """The settings for AsyncModel.stream_choices; each route adds its logprobs, which it words its own way."""
        return dict(n=self.n, max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, min_p=self.min_p or None, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                    seed=self.seed, stop=tuple(self.stop))


def within_vocabulary(value: int, info: ValidationInfo) -> int:
    vocab_size = limit(info, "vocab_size")
    if vocab_size is not None and value >= vocab_size:
        raise PydanticCustomError("token_id", "must be a token id below {vocab_size}, the model's vocabulary, got "
                                  "{given}", {"vocab_size": vocab_size, "given": value})
    return value


PROMPT_TOKEN_IDS = TypeAdapter(Annotated[list[Annotated[TokenId, AfterValidator(within_vocabulary)]],
                                         Field(min_length=1)], config=ConfigDict(strict=True))


def text_or_token_ids(value, info: ValidationInfo):
    """A prompt: text, or the token ids of one (each below the vocabulary), as OpenAI's API takes either."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return PROMPT_TOKEN_IDS.validate_python(value, context=info.context)  # its errors located inside value
    raise PydanticCustomError("prompt_type", "must be a string or a list of token ids, got {given}",
                              {"given": short_repr(value)})


def one_or_many_prompts(value, handler: ValidatorFunctionWrapHandler):
    """A prompt, or a list of prompts: a string, or a list of token ids (a list holding no strings or lists), is a
    list of one."""
    if not isinstance(value, (str, list)):
        raise PydanticCustomError("prompt_type", "must be a string, a list of token ids, or a list of such prompts, "
                                  "got {given}", {"given": short_repr(value)})
    if isinstance(value, str) or (value and not any(isinstance(item, (str, list)) for item in value)):
        return as_list_of_one(value, handler)
    return handler(value)


# An empty prompt starts a new document.
Prompts = Annotated[list[Annotated[str | list[int], PlainValidator(text_or_token_ids)]],
                    Field(min_length=1, max_length=MAX_PROMPTS), WrapValidator(one_or_many_prompts)]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: n choices for each prompt (choice i * n + j continues prompt i). With echo, a choice
    is its prompt followed by its continuation, and its logprobs cover the prompt's tokens first (the first with
    none); max_tokens may then be 0: the prompt alone, scored."""

    prompt: Prompts = Field(default_factory=lambda: [""])
    max_tokens: Annotated[Integer, Field(ge=0), AfterValidator(within_max_completion_tokens)] = 16  # 0: echo only
    logprobs: Annotated[Integer, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # alternatives per token
    echo: bool = False
    best_of: Integer | None = None  # accepted equal to n: cllm returns every choice it draws
    # OpenAI's options that cllm does not implement, accepted at the values that change nothing
    suffix: Annotated[Any, only(None)] = None

    def sampling(self) -> dict:
        return super().sampling() | {"logprobs": self.logprobs,
                                     "prompt_logprobs": self.logprobs if self.echo else None}

    @model_validator(mode="after")
    def something_to_return(self):
        if self.max_tokens == 0 and not self.echo:  # raised as the field's own error, so that `param` names it
            raise ValidationError.from_exception_data(type(self).__name__, [{
                "type": PydanticCustomError("nothing_to_return", "must be at least 1 unless 'echo' is true (0 echoes "
                                            "the prompt alone), got 0"), "loc": ("max_tokens",), "input": 0}])
        return self

    @model_validator(mode="after")
    def choices_within_limits(self):
        if self.best_of is not None and self.best_of != self.n:
            raise PydanticCustomError("best_of", "'best_of' is not supported by this server (only equal to 'n')")
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise PydanticCustomError("too_many_choices", "{prompts} prompts with n={n} make {count} choices; this "
                                      "server makes at most {most} in one request",
                                      {"prompts": len(self.prompt), "n": self.n, "count": len(self.prompt) * self.n,
                                       "most": MAX_CHOICES})
        return self


def message_content(value):
    """A message's content as one string: OpenAI's text parts joined (cllm.chat.message_text)."""
    try:
        return message_text(value)
    except UsageError as e:
        raise PydanticCustomError("content_type", "{reason}, got {given}",
                                  {"reason": str(e), "given": short_repr(value)}) from None


def as_given(value, handler: ValidatorFunctionWrapHandler):
    """The value checked as its annotation says, but kept as the client wrote it: a template prints it (tojson), key
    order and all, as transformers prints what it is given."""
    handler(value)
    return value


def from_usage_error(check, what: str):
    """check(value), with its UsageError ("what must ...") as this field's refusal ("must ...")."""
    def checked(value):
        try:
            check(value)
        except UsageError as e:
            raise PydanticCustomError(what, "{reason}", {"reason": str(e).removeprefix(f"{what} ")}) from None
        return value

    return checked


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(RequestModel):
    """A call an assistant's message made, as OpenAI returned it."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal[ROLES]
    content: Annotated[Any, AfterValidator(message_content)]
    name: str | None = None  # passed to the template, which may show it
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOLS)] | None = None  # assistant's
    tool_call_id: str | None = None  # the call a tool's message answers

    @model_validator(mode="before")
    @classmethod
    def calls_may_say_nothing(cls, data):
        """An assistant's message that calls tools may have no content (null): it says nothing else, ""."""
        if isinstance(data, dict) and data.get("role") == "assistant" and data.get("tool_calls") \
                and data.get("content") is None:
            return {**data, "content": ""}
        return data

    @model_validator(mode="after")
    def fields_of_its_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("tool_calls_role", "may hold tool_calls only as an assistant's message")
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("tool_call_id", "is a tool's message, which needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise PydanticCustomError("tool_call_id_role", "may hold a tool_call_id only as a tool's message")
        return self


class FunctionDefinition(RequestModel):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, printed by the template
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: ChosenFunction


def mode_or_named(value, handler: ValidatorFunctionWrapHandler):
    """tool_choice: a mode (a string) or a named function (an object), each checked as itself so that a refusal
    speaks of the form the client used; kept as given (cllm.tool_calls reads both)."""
    if not isinstance(value, str):
        return as_given(value, handler)
    if value not in TOOL_CHOICES:
        raise PydanticCustomError("tool_choice", "must be one of {modes} or {named}, got {given}",
                                  {"modes": ", ".join(map(json.dumps, TOOL_CHOICES)), "given": short_repr(value),
                                   "named": '{"type": "function", "function": {"name": ...}}'})
    return value


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions"""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Integer, Field(ge=1),
                                     AfterValidator(within_max_completion_tokens)] | None = None  # max_tokens' new name
    logprobs: bool = False
    top_logprobs: Annotated[Integer, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # The tools (cllm.tool_calls), checked as Tool but handed to the template as the client wrote them.
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS), WrapValidator(as_given),
                     AfterValidator(from_usage_error(tool_calling, "tools"))] | None = None
    tool_choice: Annotated[NamedToolChoice, WrapValidator(mode_or_named)] | None = None
    # The template's own arguments, as vLLM names them (Qwen3's enable_thinking)
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS),
                                    AfterValidator(from_usage_error(template_kwargs, "chat_template_kwargs"))
                                    ] | None = None
    # OpenAI's options that cllm does not implement, accepted at the values that change nothing
    response_format: Annotated[Any, only({"type": "text"})] = Field(default_factory=lambda: {"type": "text"})

    @field_validator("tool_choice")
    @classmethod
    def choice_among_tools(cls, choice, info: ValidationInfo):
        if "tools" in info.data:  # else the tools are refused already
            from_usage_error(lambda c: tool_calling(info.data["tools"], c), "tool_choice")(choice)
        return choice

    @model_validator(mode="after")
    def settled(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "'top_logprobs' needs 'logprobs' to be true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def sampling(self) -> dict:
        return super().sampling() | {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    def tool_calling(self) -> ToolCalling:
        return tool_calling(self.tools, self.tool_choice)


class TEIEmbedRequest(RequestModel):
    """POST /embed, as TEI"""

    inputs: Annotated[Texts, AfterValidator(within_batch_size)]
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    prompt_name: str | None = None  # one of the model's prompts, put before each input
    dimensions: Dimensions | None = None


class TEITokenizeRequest(RequestModel):
    """POST /tokenize, as TEI"""

    inputs: Annotated[Texts, AfterValidator(within_batch_size)]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class LlamaTokenizeRequest(RequestModel):
    """POST /tokenize, as llama.cpp (a body with "content")"""

    content: str
    add_special: bool = False
    with_pieces: bool = False


class TEIDecodeRequest(RequestModel):
    """POST /decode, as TEI"""

    ids: TokenIdLists
    skip_special_tokens: bool = True


class DetokenizeRequest(RequestModel):
    """POST /detokenize, as llama.cpp"""

    tokens: TokenIds
