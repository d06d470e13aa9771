"""The ``labkit`` command: run the course, regrade submissions, write student copies, summarise.

    labkit run --quick                  # every lab in labs/, small and fast, then the summary
    labkit run 01 02 -p epochs 5        # some labs, with a parameter for each
    labkit regrade results/executed/*.ipynb
    labkit student labs/ student/
    labkit summary
    labkit data synth                   # write the synthetic Alzheimer MRI stand-in
    labkit labs sync                    # pair each labs/NN_*.ipynb with its labs/NN_*.py source
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Sequence

# The commands import their modules when they run, not here: `labkit --help` takes 0.1 s this way, and
# importing the course runner or the regrade (torch, papermill, nbval) takes ~5 s on a 2-core machine.

DESCRIPTION = """\
labkit runs the lab course on distributed deep learning for medical imaging.

commands:
  run       execute labs with papermill (executed copies in results/executed/), then write the summary
  regrade   re-execute submitted notebooks with nbval and check that their checked outputs reproduce
  student   write student copies of the labs: solutions replaced by stubs, outputs cleared
  summary   write results/SUMMARY.md and results/summary.png from every run record
  site      build the course website (every lab as a page, the results) into results/site/
  data      dataset helpers (data synth: write the synthetic Alzheimer MRI stand-in)
  labs      keep each lab notebook and its jupytext .py source in sync (labs sync, labs check)

Run `labkit COMMAND --help` for the options of a command.
"""


#: Modules of labkit[dev] (requirements-dev.txt) that some commands need; Colab installs without them.
DEV_MODULES = {"papermill", "nbval", "jupytext", "pytest", "nbclient", "sphinx", "myst_nb", "furo", "latex2mathml"}


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=90)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="labkit", description=DESCRIPTION, formatter_class=fmt)
    from labkit import __version__

    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", formatter_class=fmt, help="execute labs with papermill, then summarise",
                         description=_wrap("Execute lab notebooks in order with papermill on this environment's Python "
                                           "kernel, from the course folder. Each executed copy is written to "
                                           "RESULTS/executed/<lab>.ipynb; one line per lab says ok or FAILED and how long "
                                           "it took, a table at the end names the cell where a lab failed, and the results "
                                           "summary is written. Exit status 1 when any lab failed."),
                         epilog="examples:\n  labkit run --quick\n  labkit run 01 02_ray -p epochs 5 -p device cpu\n"
                                "  labkit run 02 -y 'sweep: [1, 2]'\n  labkit run 02 -f params.yaml\n"
                                "  labkit run labs/01_baseline.ipynb --results /tmp/results")
    run.add_argument("labs", nargs="*", metavar="LAB",
                     help="lab number (01), name (01_baseline) or notebook path; default: every labs/*.ipynb, sorted")
    run.add_argument("--quick", action="store_true",
                     help="small data, small images, few epochs (passes -p quick True and sets LABKIT_QUICK=1)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                     help="set a notebook parameter, as with papermill -p (True/False/None, ints and floats "
                          "are read as Python values); repeatable")
    run.add_argument("-y", "--yaml", action="append", default=[], metavar="YAML",
                     help="parameters as a YAML mapping, lists and dicts included, as with papermill -y: "
                          "-y 'sweep: [1, 2]'; repeatable")
    run.add_argument("-f", "--parameters-file", action="append", default=[], metavar="FILE",
                     help="parameters from a YAML file (as papermill -f); -f, then -y, then -p: later ones win")
    run.add_argument("--results", metavar="DIR", default=None,
                     help="results folder (default: $LABKIT_RESULTS or <course>/results)")
    run.add_argument("--labs-dir", metavar="DIR", default="labs", help="folder of lab notebooks (default: labs)")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="fail a lab when one cell runs longer than this (default: no limit)")
    run.add_argument("--no-summary", action="store_true", help="do not write the results summary afterwards")
    run.add_argument("--ray-per-lab", action="store_true",
                     help="let each Ray lab start its own local cluster (default: one cluster for the whole run, "
                          "on 127.0.0.1, shut down at the end)")

    regrade = sub.add_parser("regrade", formatter_class=fmt, help="re-execute notebooks with nbval and compare outputs",
                             description=_wrap("Re-execute each submitted notebook in a fresh kernel of this environment "
                                               "with nbval (pytest --nbval-lax) and compare the outputs of the cells tagged "
                                               "nbval-check-output with the submitted ones, after "
                                               "labkit/course/nbval_sanitize.cfg "
                                               "has replaced timings, dates, run ids, addresses, paths and progress bars. "
                                               "Prints a table (notebook, cells, checked, passed, failed) and, for each "
                                               "failure, the cell and a short diff. Exit status 1 when any notebook fails. "
                                               "Run records of the re-execution go to a scratch folder, not results/."),
                             epilog="example:\n  labkit regrade results/executed/*.ipynb")
    regrade.add_argument("paths", nargs="+", metavar="PATH", help="executed notebooks to regrade")
    regrade.add_argument("--full", action="store_true",
                         help="compare every cell's output (nbval full mode), not only the tagged cells")
    regrade.add_argument("--quick", action="store_true", help="set LABKIT_QUICK=1 for the re-execution")
    regrade.add_argument("-x", "--exitfirst", action="store_true",
                         help="stop each notebook at its first failing cell (faster; later cells are not run)")
    regrade.add_argument("--tolerance", type=float, default=None, metavar="T",
                         help="how far each number of a trained-result cell (tag labkit-result) may move, "
                              "absolute (default: 0.05, for metrics printed in [0, 1]); other checked cells "
                              "must match exactly")
    regrade.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                         help="fail a cell that runs longer than this (nbval's default: 2000)")

    grade = sub.add_parser("grade", formatter_class=fmt, help="grade a class's submissions of one lab",
                           description=_wrap("Grade every submission of one lab: each notebook runs in its own process, "
                                             "scratch folder and fresh kernel (network: loopback only where the machine "
                                             "allows it), then the instructor's public and hidden checks run in its kernel "
                                             "(check modules re-imported from disk, so a redefined check gains nothing), "
                                             "and its trained results are compared with the re-run within --tolerance. "
                                             "Writes OUT/grades.csv (otter-grader's final_grades.csv columns with a "
                                             "max-points row, plus runs, reproduces, total, max, percent, status), "
                                             "OUT/feedback/<student>.md, OUT/summary.png and OUT/graded/<student>.ipynb. "
                                             "SUBMISSIONS holds one folder per student with the lab's notebook, or flat "
                                             "files with the student's name in the file name."),
                           epilog="examples:\n  labkit grade downloads/ --lab 01 --out grades/01\n"
                                  "  labkit grade downloads/ --lab 02 --out grades/02 --jobs 4 --timeout 900\n"
                                  "  labkit grade downloads/ --lab 02 --out grades/02 --address 127.0.0.1:6379")
    grade.add_argument("submissions", metavar="SUBMISSIONS", help="folder of submitted notebooks")
    grade.add_argument("--lab", required=True, metavar="NN",
                       help="the lab graded: number (01), name (01_baseline) or the instructor's notebook path")
    grade.add_argument("--out", required=True, metavar="DIR", help="folder for grades.csv, feedback/ and summary.png "
                                                                  "(replaced whole when grading ends)")
    grade.add_argument("--jobs", type=int, default=None, metavar="N",
                       help="submissions graded at once on this machine (default: what its cores and memory hold)")
    grade.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                       help="time limit per notebook (default: 1800); the grading process is killed 60 s after it")
    grade.add_argument("--cell-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="time limit per cell (default: 600)")
    grade.add_argument("--tolerance", type=float, default=0.05, metavar="T",
                       help="how far a trained result may move between the submission and the re-run (default: 0.05)")
    grade.add_argument("--address", default=None, metavar="ADDR",
                       help="grade as Ray tasks on the cluster at ADDR (e.g. 127.0.0.1:6379), one per submission")
    grade.add_argument("--quick", action="store_true",
                       help="re-run every submission in quick mode (LABKIT_QUICK=1), whatever its parameters say")
    grade.add_argument("--labs-dir", metavar="DIR", default="labs", help="folder of the instructor's labs (default: labs)")

    student = sub.add_parser("student", formatter_class=fmt, help="write student copies of the labs",
                             description=_wrap("Copy every notebook of LABS_DIR into OUTDIR with each '# BEGIN SOLUTION' ... "
                                               "'# END SOLUTION' span replaced by raise NotImplementedError('Exercise: "
                                               "complete this cell') (same indentation), and all outputs and execution "
                                               "counts cleared. An unmatched marker is an error naming notebook and "
                                               "cell; nothing is written then."),
                             epilog="example:\n  labkit student labs/ student/")
    student.add_argument("labs_dir", metavar="LABS_DIR", help="folder of lab notebooks with solutions")
    student.add_argument("out_dir", metavar="OUTDIR", help="folder for the student copies (created)")

    summary = sub.add_parser("summary", formatter_class=fmt, help="write results/SUMMARY.md and results/summary.png",
                             description=_wrap("Read every run record under the results folder and write SUMMARY.md (what the "
                                               "folder holds and one table: lab, device, workers, mode, time/epoch, final "
                                               "metric, balanced accuracy, macro-F1, majority rate, synthetic data, date) and "
                                               "summary.png (time per epoch and final metric per lab)."))
    summary.add_argument("--results", metavar="DIR", default=None,
                         help="results folder (default: $LABKIT_RESULTS or <course>/results)")

    site = sub.add_parser("site", formatter_class=fmt, help="build the course website into results/site/",
                          description=_wrap("Build a static website of the course (Sphinx + myst-nb, offline): a landing "
                                            "page, one page per lab and a results page. Each lab page is the student copy of "
                                            "the lab's executed notebook (results/executed/), with the course run's outputs "
                                            "for every cell a student does not edit; solutions and hidden checks never "
                                            "appear. A lab whose executed copy is missing or older than the lab is "
                                            "re-executed first (labkit run NN --quick). Open OUT/index.html in a browser "
                                            "(file:// works) or serve it: python -m http.server -d OUT."),
                          epilog="examples:\n  labkit site\n  labkit site --results /tmp/results --out /tmp/site")
    site.add_argument("--results", metavar="DIR", default=None,
                      help="results folder of a course run (default: $LABKIT_RESULTS or <course>/results)")
    site.add_argument("--out", metavar="DIR", default=None, help="folder for the site (default: RESULTS/site; "
                                                                 "a site built before is replaced)")
    site.add_argument("--no-rerun", action="store_true",
                      help="do not re-execute missing or stale labs; show them as they are (marked on the landing page)")
    site.add_argument("--labs-dir", metavar="DIR", default="labs", help="folder of the labs (default: labs)")

    data = sub.add_parser("data", formatter_class=fmt, help="dataset helpers",
                          description=_wrap("Dataset helpers. `labkit data synth` writes the synthetic stand-in of the Kaggle "
                                            "Alzheimer MRI dataset (same folder layout) for offline use."))
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    synth = data_sub.add_parser("synth", help="write the synthetic Alzheimer MRI stand-in",
                                description=_wrap("Write a synthetic stand-in of the Kaggle Alzheimer MRI dataset in its real "
                                                  "folder layout. It is learnable but not medical data. An existing real "
                                                  "dataset is never overwritten."))
    synth.add_argument("--data-dir", default="data/alzheimer", metavar="DIR",
                       help="target folder, relative to the course folder (default: data/alzheimer)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same images (default: 0)")
    synth.add_argument("--n-train", type=int, default=None, metavar="N", help="training images (default: as the real set)")
    synth.add_argument("--n-test", type=int, default=None, metavar="N", help="test images (default: as the real set)")

    labs = sub.add_parser("labs", formatter_class=fmt, help="sync lab notebooks with their .py sources",
                          description=_wrap("Each labs/NN_*.ipynb is paired with a jupytext percent-format labs/NN_*.py "
                                            "holding every cell, its markdown and its tags. `labkit labs sync` writes "
                                            "whichever side is older (or missing) from the other, and each lab's set-up "
                                            "cell and Colab badge from labkit/course/colab.py; "
                                            "`labkit labs check` names every lab "
                                            "whose two sides differ, or whose set-up cell or badge differs, and exits 1."))
    labs_sub = labs.add_subparsers(dest="labs_command", metavar="ACTION")
    sync = labs_sub.add_parser("sync", help="write the older side of each pair from the newer one")
    sync.add_argument("labs", nargs="*", metavar="LAB", help="only these labs (01 or 01_baseline; default: all)")
    sync.add_argument("--prefer", choices=("py", "ipynb"), default=None,
                      help="take this side as the source for every lab that differs (default: the side edited last)")
    check = labs_sub.add_parser("check", help="exit 1 naming each lab whose .ipynb and .py differ")
    for action in (sync, check):
        action.add_argument("--labs-dir", metavar="DIR", default="labs", help="folder of labs (default: labs)")
    return parser


def _cmd_labs(args: argparse.Namespace) -> int:
    from labkit.course import labsource
    from labkit.env import resolve_path

    folder = resolve_path(args.labs_dir)
    if args.labs_command == "sync":
        written = labsource.sync(folder, prefer=args.prefer, only=args.labs)
        print("\n".join(written) if written else "every lab is in sync")
        return 0
    if args.labs_command == "check":
        problems = labsource.differences(folder)
        print("\n".join(problems) if problems else "every lab is in sync", file=sys.stderr if problems else sys.stdout)
        return 1 if problems else 0
    print("labkit labs: choose an action: sync or check (see `labkit labs --help`)", file=sys.stderr)
    return 2


def _cmd_run(args: argparse.Namespace) -> int:
    from labkit.course.run import format_runs, gather_parameters, run_labs

    params = gather_parameters(args.parameters_file, args.yaml, args.parameter)
    runs = run_labs(args.labs or None, quick=args.quick, parameters=params, results_dir=args.results,
                    labs_dir=args.labs_dir, timeout=args.timeout, shared_ray=not args.ray_per_lab)
    print()
    print(format_runs(runs))
    if not args.no_summary:
        from labkit.course.summary import write_summary

        readme, png = write_summary(args.results)
        print(f"summary: {readme} and {png}")
    return 0 if all(r.ok for r in runs) else 1


def _cmd_regrade(args: argparse.Namespace) -> int:
    from labkit.course.nbval_tolerance import DEFAULT_TOLERANCE
    from labkit.course.regrade import format_reports, regrade

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    reports = regrade(args.paths, lax=not args.full, quick=args.quick, cell_timeout=args.cell_timeout,
                      exitfirst=args.exitfirst, tolerance=tolerance)
    print(format_reports(reports))
    return 0 if all(r.ok for r in reports) else 1


def _cmd_grade(args: argparse.Namespace) -> int:
    from labkit.course.grading import grade

    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: give how many submissions to grade at once, 1 or more.")
    results, paths = grade(args.submissions, args.lab, args.out, jobs=args.jobs, timeout=args.timeout,
                           cell_timeout=args.cell_timeout, tolerance=args.tolerance, address=args.address,
                           labs_dir=args.labs_dir, quick=args.quick)
    print(f"{len(results)} submission(s) graded: {paths['grades']}, {paths['feedback']}/, {paths['summary']}")
    return 0


def _cmd_student(args: argparse.Namespace) -> int:
    from labkit.course.student import write_student_versions

    written = write_student_versions(args.labs_dir, args.out_dir)
    for path, spans in written.items():
        print(f"{path}  ({spans} exercise{'s' if spans != 1 else ''} stubbed)")
    print(f"{len(written)} student notebooks written to {args.out_dir}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from labkit.course.summary import summary_frame, write_summary

    readme, png = write_summary(args.results)
    runs = len(summary_frame(args.results)[0])
    print(f"{runs} run record{'s' if runs != 1 else ''} summarised: {readme} and {png}")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    from labkit.course.site import build_site

    index = build_site(args.results, args.out, labs_dir=args.labs_dir, rerun=not args.no_rerun)
    print(f"site written: {index} (open it in a browser, or: python -m http.server -d {index.parent})")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command != "synth":
        print("labkit data: choose an action: synth (see `labkit data --help`)", file=sys.stderr)
        return 2
    from labkit.data.synth_mri import write_alzheimer_standin
    from labkit.env import resolve_path

    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    root = write_alzheimer_standin(resolve_path(args.data_dir), seed=args.seed, **sizes)
    print(f"synthetic Alzheimer MRI stand-in written to {root} (generated images, not medical data)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``labkit`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "data":
            return _cmd_data(args)
        if args.command == "labs":
            return _cmd_labs(args)
        return {"run": _cmd_run, "regrade": _cmd_regrade, "grade": _cmd_grade, "student": _cmd_student,
                "summary": _cmd_summary, "site": _cmd_site}[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"labkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in DEV_MODULES:
            raise
        print(f"labkit {args.command}: error: {exc.name} is not installed; it is one of the course tools "
              "(requirements-dev.txt): pip install -e '.[dev]', or run `make setup`.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"labkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
