"""Draw what a PMG model's gates do on a text: write-weight heatmaps and memory-horizon histograms per PMG layer.

    python scripts/plot_gates.py outputs/pmg-shakespeare $'KING HENRY.\\nNow, lords, for France!' --output gates.png
    python scripts/plot_gates.py outputs/pmg-shakespeare @passage.txt --horizon 256

A TEXT starting with @ is read from that file. MODEL may be a saved folder or a Hub id.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import pmg  # noqa: F401  (registers PMG with the Auto classes)
from pmg.gate_plots import plot_gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved PMG model folder or Hub id")
    parser.add_argument("text", help="the text, or @path to read it from a file")
    parser.add_argument("--output", default="gates.png", help="where to write the PNG")
    parser.add_argument("--max_tokens", type=int, default=64, help="tokens shown in the heatmaps")
    parser.add_argument("--horizon", type=int, default=None, help="a span to mark on the histograms (block size)")
    args = parser.parse_args()
    text = Path(args.text[1:]).read_text() if args.text.startswith("@") else args.text
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(plot_gates(model, tokenizer, text, args.output, max_tokens=args.max_tokens, horizon=args.horizon))


if __name__ == "__main__":
    main()
