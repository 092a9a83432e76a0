"""Sample text from a saved or Hub causal language model (PMG or any other).

    python scripts/generate.py --model_name_or_path outputs/pmg-shakespeare --prompt "KING HENRY." --do_sample
    python scripts/generate.py --model_name_or_path outputs/pmg-shakespeare --num_beams 4 --max_new_tokens 40

`import pmg` registers PMG with the Auto classes, so PMG checkpoints load without remote code here.
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

import pmg  # noqa: F401  (registers PMG with the Auto classes)
from pmg.data import load_tokenizer


@dataclass
class GenerateArguments:
    """Decoding options left unset come from the model's `generation_config`, as `model.generate()` takes them (its
    recommended sampling settings, say); `max_new_tokens` then defaults to 100."""

    model_name_or_path: str = field(metadata={"help": "A folder written by save_pretrained, or a Hub model id."})
    prompt: list[str] = field(default_factory=lambda: ["\n"], metadata={"help": "One or more prompts."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens to generate per sequence (default: the model's, else 100)."}
    )
    do_sample: bool = field(
        default=False,
        metadata={
            "help": "Sample instead of greedy / beam search (without it: as the model's generation_config says)."
        },
    )
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature."})
    top_k: int | None = field(default=None, metadata={"help": "Sample from the k most likely tokens."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling threshold."})
    num_beams: int | None = field(default=None, metadata={"help": "Beam search width."})
    num_return_sequences: int | None = field(default=None, metadata={"help": "Sequences per prompt."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow modeling code shipped with the model."})


DECODING_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "num_return_sequences")


def generate(args: GenerateArguments) -> list[str]:
    """The generated continuations, `num_return_sequences` per prompt, prompts included."""
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # an empty prompt starts from the end-of-text token (generate needs at least one token to continue)
    prompts = [prompt or tokenizer.eos_token for prompt in args.prompt]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    options = {name: getattr(args, name) for name in DECODING_OPTIONS if getattr(args, name) is not None}
    if args.do_sample:
        options["do_sample"] = True
    if model.generation_config.max_new_tokens is None:
        options.setdefault("max_new_tokens", 100)
    with torch.no_grad():
        output = model.generate(**inputs, **options, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(output, skip_special_tokens=True)


def main() -> None:
    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses()
    for text in generate(args):
        print(text)
        print("-" * 40)


if __name__ == "__main__":
    main()
