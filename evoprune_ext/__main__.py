"""The `evoprune` command (also `python -m evoprune_ext`)."""

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="evoprune", description="EvoPrune: visual token pruning inside vision encoders"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="time EvoPrune in a CLIP ViT-L/14-336 encoder and draw what it keeps")
    demo.add_argument("--weights", metavar="DIR", help="a local Hugging Face CLIP checkpoint (default: random weights)")
    demo.add_argument("--out", default="evoprune_demo.png", metavar="PATH", help="where to write the picture (PNG)")
    demo.add_argument("--quick", action="store_true", help="a small encoder and fewer runs (seconds, for tests)")
    args = parser.parse_args(argv)

    from evoprune_ext import demo as demo_module

    demo_module.run(weights=args.weights, out_path=args.out, quick=args.quick)


if __name__ == "__main__":
    main()
