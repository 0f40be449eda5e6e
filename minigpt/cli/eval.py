"""Evaluate consolidated weights: bits per byte, multiple choice, verifiable tasks.

    python launch/eval.py --model checkpoints/pretrain_tiny/final --task bpb:data/val.txt
    python launch/eval.py --model runs/sft --task tasks:heldout/rlhf.jsonl --exclude-from tasks/sft.jsonl
    python launch/eval.py --model DIR --task mc:cmmlu/test.csv,dev=cmmlu/dev.csv,shots=5 --out results.json
    deepspeed --num_gpus 2 launch/eval.py --model DIR --task ...     (data-parallel: the same numbers)

--task KIND:PATH[,key=value...], repeatable:
  bpb:PATH     text (.txt, .jsonl[.gz]) or a shard directory (split=val): bpb, nats/token, perplexity
               options: split=, field= (JSONL text field), seq_len=, max_tokens=, name=
  mc:PATH      multiple choice (.jsonl/.csv: question, A.., answer): acc, acc_norm
               options: dev=PATH, shots=N, style=text|letter, limit=N, name=
  tasks:PATH   make_tasks files, greedy answers in the chat template: exact_match, reward
               options: max_new_tokens=N (16), partial=true|false, limit=N, name=

Exit codes: 0 done, 2 bad usage or unusable input (the message names the file or field).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minigpt.cli.args import FlagParser
from minigpt.evaluation.spec import TaskSpecError, parse_task_spec
from minigpt.i18n import _


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/eval.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="consolidated weights directory, or a run directory (its final/ is used)")
    parser.add_argument("--task", action="append", required=True, metavar="KIND:PATH[,key=value...]",
                        help="a task to run (repeatable); see above")
    parser.add_argument("--exclude-from", action="append", default=[], metavar="JSONL",
                        help="training file(s) whose prompts are left out of mc and tasks evaluation sets "
                             "(repeatable; the number left out is reported as 'excluded')")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences (tasks, windows, items) per forward pass")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: auto-detect)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dist-timeout", type=int, default=600,
                        help="seconds a rank waits for the others in a collective (data-parallel runs)")
    # The deepspeed launcher appends --local_rank=N; the rank is also in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        specs = [parse_task_spec(entry) for entry in args.task]
    except TaskSpecError as err:
        parser.error(str(err))
    if args.batch_size < 1:
        parser.error(_("--batch-size must be positive, got {value}").format(value=args.batch_size))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        parser.error(_("two tasks share the name {name!r}; add name=... to one of them")
                     .format(name=next(n for n in names if names.count(n) > 1)))

    from minigpt.config import ConfigError, EngineSection
    from minigpt.data.shards import ShardError
    from minigpt.data.sources import InputError
    from minigpt.data.tasks import read_prompts
    from minigpt.engine import create_runtime
    from minigpt.evaluation.context import EvalContext, EvalDataError
    from minigpt.evaluation.runner import check_task_files, format_table, run_tasks
    from minigpt.fsutil import atomic_write_text
    from minigpt.tokenizer import TokenizerError
    from minigpt.weights import WeightsError, load_consolidated, model_directory

    try:
        for spec in specs:
            for path in [spec.path] + ([Path(spec.get("dev"))] if spec.get("dev") else []):
                if not path.exists():
                    raise EvalDataError(_("--task {task}: {path} does not exist").format(task=spec.text, path=path))
            check_task_files(spec)  # before the model is loaded
        exclude = frozenset(read_prompts(args.exclude_from)) if args.exclude_from else frozenset()
        runtime = create_runtime(EngineSection(device=args.device, dist_timeout=args.dist_timeout))
        directory = model_directory(args.model)
        model, tokenizer = load_consolidated(directory, device=runtime.device)
        if tokenizer is None:
            raise WeightsError(_("{path}: no tokenizer files beside the weights; evaluation needs them")
                               .format(path=directory))
        ctx = EvalContext(model, tokenizer, runtime, batch_size=args.batch_size, progress=not args.no_progress,
                          exclude=exclude)
        results = run_tasks(specs, ctx)
    except (ConfigError, WeightsError, TokenizerError, ShardError, InputError, EvalDataError, ValueError) as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    if runtime.is_main:
        excluded = (_(", {count:,} training prompts excluded").format(count=len(exclude))
                    if args.exclude_from else "")
        print(_("model {path} ({params:,} parameters), {ranks} rank(s)")
              .format(path=directory, params=model.num_params(), ranks=runtime.world_size) + excluded)
        print(format_table(results))
        if args.out:
            document = {"model": str(directory), "world_size": runtime.world_size,
                        "exclude_from": args.exclude_from, "excluded_prompts": len(exclude),
                        "tasks": {spec.name: {"kind": spec.kind, "path": str(spec.path), "options": spec.options,
                                              "metrics": results[spec.name]} for spec in specs}}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
            print(_("results written to {path}").format(path=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
