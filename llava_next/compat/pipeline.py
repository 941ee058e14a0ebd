"""`pipeline("image-text-to-text", ...)`: transformers' ImageTextToTextPipeline (5.x) on our processor and model.

Inputs, as transformers takes them:
- a chat (a list of {"role", "content"} messages; image parts carry "url" (http(s), file://, data:), "path",
  "image" (PIL or a path/URL) or "base64"), or a list of chats;
- `images=` (a path, URL, PIL image, or lists of them) with `text=` (a prompt holding `<image>`, or a list);
- text alone; or dicts {"images"/"image": ..., "text": ...}.

Outputs are transformers' records: `{"input_text": the chat or prompt, "generated_text": ...}` where
`generated_text` is the new text (`return_full_text=False`), or by default the prompt + new text for a string
prompt and the chat plus a new {"role": "assistant", "content": text} message for a chat (appended to the final
message's last text part when that message is an assistant prefill). `return_tensors=True` gives
"generated_token_ids" instead. One chat or one prompt gives a list of records; a list of chats or of prompts
gives a list of such lists, in input order.

Postprocessing is transformers' code path: the whole sequence (prompt + new tokens) and the prompt are decoded
with special tokens skipped, and the decoded prompt is removed from the front of the decoded sequence if it is
found within its first 2 characters. Call arguments are routed, and inputs recognised, loaded and batched, by
pipeline_inputs.py.

Where it differs from transformers, on purpose:
- a list of chats (or of dict inputs) runs as left-padded batches of `batch_size` (default 8) instead of one at
  a time; each row generates exactly what it generates alone (positions come from the attention mask);
- several prompts in one `text=` list are padded on the left whatever the tokenizer's padding_side (the right
  padding transformers uses then breaks decoder-only generation);
- generation arguments given to a call (`pipe(chat, do_sample=True, temperature=0.7)`) are used; transformers
  5.x sends them to the processor, which ignores them, and only honours them in `generate_kwargs=` or at init;
  all of them are checked (unknown names included) before any image is loaded;
- with `return_tensors=True`, "input_text" is the list of messages rather than transformers' `Chat` object.

Leaves out: tasks other than image-text-to-text, assistant models, `tools` parsing (`response_template`),
datasets/KeyDataset inputs (any iterable of inputs is accepted and consumed eagerly), `num_workers`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from llava_next.compat import pipeline_inputs as PI
from llava_next.compat.generate_args import check_generate_kwargs
from llava_next.compat.pipeline_inputs import ReturnType
from llava_next.errors import DeviceUnavailableError

TASKS = ("image-text-to-text",)
DEFAULT_BATCH_SIZE = 8



def pipeline(task: str | None = None, model=None, config=None, tokenizer=None, feature_extractor=None,
             image_processor=None, processor=None, revision: str | None = None, use_fast: bool = True, token=None,
             device=None, device_map=None, dtype="auto", trust_remote_code: bool | None = None,
             model_kwargs: dict | None = None, pipeline_class=None, torch_dtype=None, **kwargs):
    """Build an image-text-to-text pipeline from a folder, a hub id, or a loaded LlavaNextForConditionalGeneration.

    Signature of transformers' `pipeline()`: `device` (int: CUDA index, -1: CPU; str; torch.device; default CUDA
    when available) or `device_map`; `dtype`/`torch_dtype` ("auto" = the checkpoint's); `model_kwargs` for
    `from_pretrained`. Other keyword arguments are defaults for every call (generation arguments such as
    max_new_tokens, return_full_text, batch_size, ...). `trust_remote_code` is accepted and ignored: remote code is
    never run. `config`, `tokenizer`, `feature_extractor`, `image_processor` and `pipeline_class` are refused.
    `allow_local_network=True` lets image URLs (and chat `url` parts) reach loopback, private and link-local
    addresses; by default they are refused (see `preprocess.images`).
    """
    if task is None:
        task = TASKS[0]
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: llava_next's pipeline supports only {', '.join(map(repr, TASKS))}")
    if model is None:
        raise ValueError("pipeline() needs model= (a checkpoint folder, a hub id, or a loaded model)")
    for name, value in (("config", config), ("tokenizer", tokenizer), ("feature_extractor", feature_extractor),
                        ("image_processor", image_processor), ("pipeline_class", pipeline_class)):
        if value is not None:
            raise ValueError(f"pipeline(): {name}= is not supported by llava_next; pass processor= (a "
                             "LlavaNextProcessor or a folder/hub id) or leave it to be loaded with the model")
    from llava_next.compat.modeling import LlavaNextForConditionalGeneration
    from llava_next.preprocess.processor import AutoProcessor

    hub_kwargs = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    model_kwargs = dict(model_kwargs or {})
    if torch_dtype is not None and dtype == "auto":  # as transformers: torch_dtype is the deprecated spelling
        dtype = torch_dtype
    if "torch_dtype" in model_kwargs:
        model_kwargs.setdefault("dtype", model_kwargs.pop("torch_dtype"))
    if dtype is not None and dtype != "auto":
        if "dtype" in model_kwargs:
            raise ValueError("dtype is given both to pipeline() and in model_kwargs; give it once")
        model_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else dtype
    if device_map is not None:
        if "device_map" in model_kwargs:
            raise ValueError("device_map is given both to pipeline() and in model_kwargs; give it once")
        model_kwargs["device_map"] = device_map

    target = None if device_map is not None or "device_map" in model_kwargs else resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        name = model
        if target is not None:
            model_kwargs.setdefault("device", str(target))
        model = LlavaNextForConditionalGeneration.from_pretrained(name, **hub_kwargs, **model_kwargs)
    else:
        name = getattr(model, "name_or_path", None)
    if processor is None:
        if name is None:
            raise ValueError("pass processor= with a loaded model (its checkpoint folder is not known)")
        processor = AutoProcessor.from_pretrained(name, **hub_kwargs)
    elif isinstance(processor, (str, os.PathLike)):
        processor = AutoProcessor.from_pretrained(processor, **hub_kwargs)
    return ImageTextToTextPipeline(model=model, processor=processor, device=target, task=task, **kwargs)


def resolve_device(device) -> torch.device:
    """transformers' rule: None -> CUDA 0 when available, else CPU; int -> CUDA index (-1: CPU); str/device as is.

    A CUDA device asked for explicitly (`device=0`, `"cuda"`, `"cuda:1"`) where there is no such device is a
    RuntimeError saying so (the kind torch raises for a missing CUDA), never a silent fall-back to the CPU.
    """
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        resolved = torch.device("cpu") if device < 0 else torch.device(f"cuda:{device}")
    elif isinstance(device, (str, torch.device)):
        resolved = torch.device(device)  # an unknown name: torch's RuntimeError
    else:
        raise ValueError(f"device must be an int, a string or a torch.device, got {device!r}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceUnavailableError(f"device={device!r} asks for CUDA, but CUDA is not available here (no GPU, or a "
                               "CPU-only torch build); pass device='cpu' or device=-1")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceUnavailableError(f"device={device!r} asks for CUDA device {resolved.index}, but only {count} "
                               f"CUDA device(s) are available")
    return resolved


class ImageTextToTextPipeline:
    """Callable like transformers' ImageTextToTextPipeline: `pipe(text=chat, max_new_tokens=20)`."""

    def __init__(self, model, processor, device=None, task: str = TASKS[0], batch_size: int | None = None,
                 num_workers=None, **kwargs):
        self.task = task
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        if device is not None and model.device != torch.device(device):
            self.model.to(device)
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._defaults = PI.sanitize(self.tokenizer, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __repr__(self) -> str:
        return (f"ImageTextToTextPipeline: {{'model': {type(self.model).__name__!r}, 'dtype': "
                f"{str(self.dtype).split('.')[-1]!r}, 'device': {self.device.type!r}}}")

    # ------------------------------------------------------------------ __call__

    def __call__(self, images=None, text=None, batch_size: int | None = None, num_workers=None, **kwargs):
        """Chat(s), or images + prompt(s), or prompt(s) alone -> transformers' records (see the module docstring)."""
        if images is None and text is None:
            raise ValueError("You must at least provide either text or images.")
        pre, generate, post = PI.merged(self._defaults, PI.sanitize(self.tokenizer, **kwargs))
        generate = PI.with_generation_defaults(self.model, self.tokenizer, generate)
        check_generate_kwargs(self.model, generate)  # typos and wrong kinds fail before any image is loaded
        if text is not None and not isinstance(text, (str, list, tuple, Mapping)) and hasattr(text, "__iter__"):
            text = list(text)  # a generator of chats or prompts: consumed eagerly
        size = self.batch_size if batch_size is None else int(batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        if PI.is_chat(text):
            if images is not None:
                raise ValueError(
                    "Invalid input: you passed `chat` and `images` as separate input arguments. Images must be placed "
                    "inside the chat message's `content`. For example, 'content': [{'type': 'image', 'url': "
                    "'image_url'}, {'type': 'text', 'text': 'Describe the image.'}]"
                )
            return self._run_chats(text, pre, generate, post, size)
        if text is None and PI.is_chat(images):
            return self._run_chats(images, pre, generate, post, size)
        if images is not None and text is None:
            items = PI.as_dict_inputs(images)
            if items is None:
                raise ValueError("You must provide text for this pipeline.")
            single = isinstance(images, Mapping)
            results = self._run_batched(items, pre, generate, post, size)
            return results[0] if single else results
        if images is None:
            if isinstance(text, str):
                return self._run_batched([{"text": text}], pre, generate, post, 1)[0]
            if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
                return self._run_batched([{"text": t} for t in text], pre, generate, post, size)
            raise ValueError("text must be a string, a list of strings, a chat or a list of chats")
        # images + text: one input (several prompts in it are one left-padded batch), as transformers does
        return self._run_batched([{"images": images, "text": text}], pre, generate, post, 1)[0]

    def _run_chats(self, chats, pre, generate, post, size):
        if isinstance(chats[0], Mapping):
            return self._run_batched([PI.Chat(chats)], pre, generate, post, 1)[0]
        return self._run_batched([PI.Chat(chat) for chat in chats], pre, generate, post, size)

    def _run_batched(self, items: list, pre, generate, post, size: int) -> list:
        """Preprocess each item alone (transformers' path), generate in left-padded batches, postprocess each."""
        if self.tokenizer.pad_token_id is None or generate.get("streamer") is not None:
            size = 1  # no pad token, or a streamer (one sequence at a time): rows run one by one
        prepared = [self.preprocess(item, **pre) for item in items]
        results = []
        for group in PI.batches(prepared, size):
            outputs = self._forward(group, generate)
            results.extend(self.postprocess(out, **post) for out in outputs)
        return results

    # ------------------------------------------------------------------ steps

    def preprocess(self, item, timeout=None, continue_final_message=None, processor_kwargs=None,
                   template_kwargs=None, allow_local_network=False) -> dict:
        """One input -> {"inputs": BatchFeature (1 or more rows), "text": what "input_text" reports}."""
        processor_kwargs = dict(processor_kwargs or {})
        if allow_local_network:
            processor_kwargs["allow_local_network"] = True
        template_kwargs = dict(template_kwargs or {})
        if isinstance(item, PI.Chat):
            if continue_final_message is None:  # a chat ending with an assistant turn is a prefill
                continue_final_message = item.messages[-1]["role"] == "assistant"
            inputs = self.processor.apply_chat_template(
                item.messages, continue_final_message=continue_final_message, return_tensors="pt", tokenize=True,
                return_dict=True, add_generation_prompt=not continue_final_message, processor_kwargs=processor_kwargs,
                **template_kwargs,
            )
            return {"inputs": inputs, "text": item}
        processor_kwargs = {**template_kwargs, **processor_kwargs}
        text = item["text"]
        images = item.get("images")
        if images is not None:
            images = PI.load_images(images, timeout, bool(processor_kwargs.pop("allow_local_network", False)))
        if isinstance(text, (list, tuple)) and len(text) > 1:
            processor_kwargs.setdefault("padding", True)
            processor_kwargs.setdefault("padding_side", "left")
        inputs = self.processor(images=images, text=text, return_tensors="pt", **processor_kwargs)
        return {"inputs": inputs, "text": item.get("input_text", text)}

    def _forward(self, group: list[dict], generate: dict) -> list[dict]:
        """Generate for a group of preprocessed inputs in one left-padded batch; split the outputs back."""
        inputs = PI.collate([g["inputs"] for g in group], self.tokenizer.pad_token_id)
        inputs = inputs.to(dtype=self.dtype).to(self.device)
        sequences = self.model.generate(**inputs, **generate)
        if not isinstance(sequences, torch.Tensor):  # return_dict_in_generate
            sequences = sequences.sequences
        input_ids = inputs["input_ids"]
        if sequences.shape[0] > input_ids.shape[0]:  # several sequences per prompt (num_return_sequences)
            sequences = sequences.reshape(input_ids.shape[0], -1, sequences.shape[-1])
        outputs, row = [], 0
        for g in group:
            n = g["inputs"]["input_ids"].shape[0]
            outputs.append({"generated_sequence": sequences[row:row + n], "input_ids": input_ids[row:row + n],
                            "prompt_text": g["text"]})
            row += n
        return outputs

    def postprocess(self, model_outputs: dict, return_type=ReturnType.FULL_TEXT, continue_final_message=None,
                    skip_special_tokens=None, tools=None, **decode_kwargs) -> list[dict]:
        """transformers' ImageTextToTextPipeline.postprocess, record for record."""
        input_texts = model_outputs["prompt_text"]
        input_texts = [input_texts] if isinstance(input_texts, (str, PI.Chat)) else list(input_texts)
        generated = model_outputs["generated_sequence"]
        input_ids = model_outputs["input_ids"]
        if generated.dim() == 3:
            generated = generated.flatten(0, 1)
        per_input = len(generated) // len(input_texts)
        input_texts = [t for t in input_texts for _ in range(per_input)]
        if return_type == ReturnType.TENSORS:
            return [{"input_text": PI.plain(input_texts[i]), "generated_token_ids": generated[i]}
                    for i in range(len(input_texts))]

        skip = True if skip_special_tokens is None else skip_special_tokens
        generated_texts = self.processor.batch_decode(generated, skip_special_tokens=skip, **decode_kwargs)
        decoded_inputs = self.processor.batch_decode(input_ids, skip_special_tokens=skip, **decode_kwargs)
        decoded_inputs = [t for t in decoded_inputs for _ in range(per_input)]
        new_texts = []
        for full, prompt in zip(generated_texts, decoded_inputs):
            # the decoded prompt may start after a few residual characters (a space, a newline)
            index = full.find(prompt)
            new_texts.append(full[index + len(prompt):] if 0 <= index <= 2 else full)

        if return_type == ReturnType.FULL_TEXT:
            full_texts = []
            for prompt, new in zip(input_texts, new_texts):
                if isinstance(prompt, str):
                    full_texts.append(prompt + new)
                    continue
                messages = prompt.messages
                prefill = continue_final_message
                if prefill is None:
                    prefill = messages[-1]["role"] == "assistant"
                if prefill:  # the answer continues the final message's last part
                    last = dict(messages[-1]["content"][-1].items())
                    last["text"] += new
                    full_texts.append(list(messages)[:-1] + [
                        {"role": messages[-1]["role"], "content": messages[-1]["content"][:-1] + [last]}])
                else:
                    full_texts.append(list(messages) + [{"role": "assistant", "content": new}])
            new_texts = full_texts
        return [{"input_text": PI.plain(t), "generated_text": g} for t, g in zip(input_texts, new_texts)]


__all__ = ["pipeline", "ImageTextToTextPipeline", "ReturnType", "TASKS"]
