"""Demos of a trained checkpoint: rank videos for a text query, or find the moments of one video.

    python demo.py search -r runs/toy/translate_train/demo/latest.pt \\
        --videos cache/multi_toy/multi_toy_test.pkl --query "a person cuts an onion" --html hits.html
    python demo.py moments -r runs/toy/translate_train/demo/latest.pt \\
        --video cache/multi_toy/multi_toy_test.pkl:toy01004 --query "someone washes a cup" --plot moments.png
    python demo.py serve -r runs/toy/translate_train/demo/latest.pt --videos cache/multi_toy/multi_toy_test.pkl

Queries may be in any language: they go through the checkpoint's own tokenizer.
"""
import argparse
import sys
from pathlib import Path

from parse_config import select_device
from common.errors import run_command
from utils.inference import (InferenceError, Retriever, VideoIndex, find_video, read_videos,
                             results_html)
from utils.moments import matching_event, plot_moments, score_moments


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="rank the videos of a data file for a text query")
    search.add_argument("--videos", required=True, metavar="DATA", help="a data file the data layer reads")
    search.add_argument("--top", type=int, default=10, help="number of videos to print (default 10)")
    search.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML page of the results")
    search.set_defaults(func=run_search)
    moments = commands.add_parser("moments", help="find the frames of one video that match a text query")
    moments.add_argument("--video", required=True, metavar="DATA:ID", help="data file and video id")
    moments.add_argument("--window", type=int, default=4, help="frames per window (default 4, stride 1)")
    moments.add_argument("--plot", metavar="OUT.png", help="write a PNG of the score over time")
    moments.add_argument("--event", type=int, metavar="N",
                         help="Multi-Toy: mark event N as the true segment (default: the event the query names)")
    moments.set_defaults(func=run_moments)
    serve = commands.add_parser("serve", help="a local search page: queries in any language, moments of each hit")
    serve.add_argument("--videos", metavar="DATA", help="a data file the data layer reads: its videos are encoded "
                                                        "at start, and give the captions and the moments plots")
    serve.add_argument("--index", metavar="INDEX", help="a saved VideoIndex to search instead of encoding --videos")
    serve.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free port)")
    serve.set_defaults(func=run_serve)
    for sub in (search, moments):
        sub.add_argument("--query", required=True, help="the text query, in any language")
    for sub in (search, moments, serve):
        sub.add_argument("-r", "--resume", required=True, metavar="CHECKPOINT", help="a trained checkpoint")
        sub.add_argument("--layout", help="data layout (default: the checkpoint config's data.layout)")
        sub.add_argument("--feature-key", help="feature key (default: the checkpoint config's data.feature_key)")
        sub.add_argument("-d", "--device", help="torch device (default: cuda if available, else cpu)")
        sub.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    return run_command(lambda: args.func(args), args.debug)


def load_retriever(args):
    return Retriever.from_checkpoint(args.resume, select_device(args.device))


def read_data(retriever, path, args):
    data = retriever.config["data"]
    return read_videos(path, args.layout or data["layout"], args.feature_key or data["feature_key"],
                       data.get("allow_duplicate_ids", False))


def run_search(args):
    retriever = load_retriever(args)
    retriever.check_query(args.query)  # before the collection is encoded
    corpus = read_data(retriever, args.videos, args)
    hits = retriever.search(args.query, retriever.build_index(corpus.ids, corpus.features), top=args.top)
    print(f"query: {args.query}")
    print(f"{'rank':>4}  {'score':>6}  video")
    for rank, (video_id, score) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:6.3f}  {video_id}")
    if args.html:
        page = results_html(args.query, hits, corpus, checkpoint=args.resume)
        try:
            Path(args.html).write_text(page, encoding="utf-8")
        except OSError as e:
            raise InferenceError(f"{args.html}: cannot write the page ({e.strerror or e})") from None
        print(f"wrote {args.html}")


def run_moments(args):
    retriever = load_retriever(args)
    path, sep, video_id = args.video.rpartition(":")
    if not sep or not path or not video_id:
        raise InferenceError(f"--video {args.video}: expected DATA:ID, a data file and a video id")
    retriever.check_query(args.query)
    corpus = read_data(retriever, path, args)
    item = find_video(corpus, video_id)
    moments = score_moments(retriever, corpus.features[item], args.query, window=args.window,
                            name=f"{path}: video {video_id!r}")
    start, end, score = moments.best
    print(f"query: {args.query}")
    print(f"video {video_id}: {len(moments.frame_scores)} frames, {len(moments.windows)} windows of "
          f"{min(args.window, len(moments.frame_scores))}")
    print(f"best segment: frames {start}-{end} (end exclusive), score {score:.3f}")

    events = corpus.extras[item].get("events") if corpus.extras else None
    true_span = None
    if args.event is not None and not 0 <= args.event < len(events or ()):
        raise InferenceError(f"--event {args.event}: video {video_id} has "
                             + (f"events 0-{len(events) - 1}" if events else "no event annotations"))
    if events:
        n = matching_event(events, args.query) if args.event is None else args.event
        if n is None:
            print("true segment: the query names no event of this video (pick one with --event N)")
        else:
            true_span = (events[n]["start"], events[n]["end"])
            overlap = start < true_span[1] and end > true_span[0]
            print(f"true segment: event {n} \"{events[n]['caption_en']}\" frames {true_span[0]}-{true_span[1]}"
                  f" ({'overlaps' if overlap else 'does not overlap'} the best segment)")
    if args.plot:
        plot_moments(moments, args.plot, args.query, title=f"video {video_id}", true_span=true_span)
        print(f"wrote {args.plot}")


def run_serve(args):
    from utils.search_server import SearchService, bind_local, serve
    if not args.videos and not args.index:
        raise InferenceError("serve needs --videos DATA (encoded at start) or --index INDEX (a saved index)")
    sock = bind_local(args.port)  # a busy port fails before the checkpoint is loaded
    retriever = load_retriever(args)
    corpus = read_data(retriever, args.videos, args) if args.videos else None
    index = (VideoIndex.load(args.index) if args.index
             else retriever.build_index(corpus.ids, corpus.features))
    serve(SearchService(retriever, index, corpus, title=f"checkpoint {args.resume}"), sock)


if __name__ == "__main__":
    sys.exit(main())
