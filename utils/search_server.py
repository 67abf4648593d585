"""A local search page: type a query in any language, see the ranked videos with their captions
in every language, open one to plot where in it the query matches best.

    python demo.py serve -r runs/toy/translate_train/demo/latest.pt --videos cache/multi_toy/multi_toy_test.pkl

The collection is embedded once at start (or read from a saved ``VideoIndex``) and kept in
memory; each query is encoded and searched in that index. The page (one self-contained HTML file,
no external resources) asks the JSON API below and shows how long each search took.

    GET /                       the page
    GET /api/search?q=...&top=  {"query", "results": [{"id", "score", "captions": {lang: [...]}}], "ms"}
    GET /api/moments?q=...&id=  {"best": [start, end, score], "plot": "data:image/png;base64,..."}

An empty query and a query that the checkpoint's tokenizer reads as unknown tokens only are
answered with status 400 and {"error": "..."}, which the page shows.
"""
import base64
import errno
import html
import io
import socket
import threading
import time

from utils.inference import InferenceError
from utils.moments import matching_event, plot_moments, score_moments

HOST = "127.0.0.1"  # local only: the page runs a model for whoever can reach it


def bind_local(port):
    """A listening socket on 127.0.0.1:``port``, bound before the collection is encoded so that a
    busy port fails at once. A port in use is an InferenceError."""
    if not 0 <= port <= 65535:
        raise InferenceError(f"--port {port}: expected 1 to 65535 (0: any free port)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A restarted server may reuse a port whose old connections linger in TIME_WAIT; Linux still
    # refuses a port that another socket listens on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InferenceError(f"port {port} on {HOST} is in use (a server may already run there): "
                                 "stop it or choose another with --port") from None
        raise InferenceError(f"cannot listen on {HOST}:{port} ({e.strerror or e})") from None
    sock.listen(64)
    return sock


class SearchService:
    """What the page asks for, answered from ``index`` in memory; ``corpus`` (optional) gives each
    video's captions and its features for the moments plot."""

    def __init__(self, retriever, index, corpus=None, title=""):
        self.retriever, self.index, self.corpus, self.title = retriever, index, corpus, title
        self._item = {vid: i for i, vid in enumerate(corpus.ids)} if corpus is not None else {}
        missing = [vid for vid in index.ids if vid not in self._item] if corpus is not None else []
        if missing:
            raise InferenceError(f"{corpus.path}: has no video '{missing[0]}' of the index ({len(missing)} of "
                                 f"{len(index)} missing); give the data file the index was built from")
        retriever.check_index(index)
        index.build()  # a FAISS index is built now, not on the first query
        # One request at a time: a fast tokenizer raises when two threads call it at once.
        self._lock = threading.Lock()

    def search(self, query, top):
        with self._lock:
            self.retriever.check_query(query)
            start = time.perf_counter()  # the query's encoding and the index search
            hits = self.retriever.search(query, self.index, top=top)
            ms = 1e3 * (time.perf_counter() - start)
        results = []
        for video_id, score in hits:
            i = self._item.get(video_id)
            captions = {lang: list(caps[i]) for lang, caps in self.corpus.captions.items()} if i is not None else {}
            results.append({"id": video_id, "score": score, "captions": captions})
        return {"query": query, "results": results, "ms": ms, "videos": len(self.index),
                "method": type(self.index.method).__name__}

    def moments(self, query, video_id, window=4):
        with self._lock:
            return self._moments(query, video_id, window)

    def _moments(self, query, video_id, window):
        self.retriever.check_query(query)
        if self.corpus is None:
            raise InferenceError("no video features: start the server with --videos to plot moments")
        i = self._item.get(video_id)
        if i is None:
            raise InferenceError(f"unknown video id '{video_id}'")
        window = min(window, self.retriever.config["data"]["n_video_tokens"])
        moments = score_moments(self.retriever, self.corpus.features[i], query, window=window,
                                name=f"video '{video_id}'")
        events = self.corpus.extras[i].get("events") if self.corpus.extras else None
        n = matching_event(events, query) if events else None
        true_span = (events[n]["start"], events[n]["end"]) if n is not None else None
        png = io.BytesIO()
        plot_moments(moments, png, query, title=f"video {video_id}", true_span=true_span)
        return {"id": video_id, "best": list(moments.best), "frames": len(moments.frame_scores),
                "true_span": list(true_span) if true_span else None,
                "plot": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}


def build_app(service):
    """The FastAPI application of ``service``: the page and its two JSON endpoints."""
    from fastapi import FastAPI, Query
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="C2KD video search", docs_url=None, redoc_url=None, openapi_url=None)
    # A page of another site must not reach the server through a DNS name rebound to 127.0.0.1.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"])

    def answer(compute):
        try:
            return compute()
        except InferenceError as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.replace("{{title}}", html.escape(service.title)).replace("{{videos}}", str(len(service.index)))

    @app.get("/api/search")
    def search(q: str = "", top: int = Query(10, ge=1, le=100)):
        return answer(lambda: service.search(q, top))

    @app.get("/api/moments")
    def moments(q: str = "", id: str = ""):
        return answer(lambda: service.moments(q, id))

    return app


def serve(service, sock, log_level="warning"):
    """Serve ``service`` on the listening socket ``sock`` until interrupted."""
    import uvicorn
    host, port = sock.getsockname()[:2]
    print(f"search page: http://{host}:{port}  ({len(service.index)} videos; Ctrl+C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(build_app(service), log_level=log_level)).run(sockets=[sock])


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Video search</title>
<style>
body { font-family: sans-serif; margin: 1.5em 2em; max-width: 72em; color: #222; }
form { display: flex; gap: .5em; margin: 1em 0; }
input[type=search] { flex: 1; font-size: 1.1em; padding: .4em; }
button { font-size: 1em; padding: .4em 1em; cursor: pointer; }
.meta, #status { color: #555; }
#message { color: #a00; font-weight: bold; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: .35em; text-align: left; vertical-align: top; }
td.score { font-family: monospace; white-space: nowrap; }
.bar { background: #4a7; height: .45em; }
td.captions ul { margin: 0; padding-left: 1.1em; }
.lang { color: #777; font-family: monospace; }
#moments img { max-width: 100%; border: 1px solid #ccc; }
</style>
</head>
<body>
<h1>Video search</h1>
<p class="meta">{{title}} &middot; {{videos}} videos &middot; queries in any language</p>
<form id="search">
<input type="search" id="query" name="q" placeholder="a person cuts an onion in the kitchen" autofocus>
<button type="submit" id="go">Search</button>
</form>
<p id="message" role="alert"></p>
<p id="status"></p>
<div id="moments"></div>
<table id="results" hidden>
<thead><tr><th>rank</th><th>score</th><th>video</th><th>captions</th></tr></thead>
<tbody></tbody>
</table>
<script>
const $ = (id) => document.getElementById(id);

function element(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;  // text only: nothing from the server is parsed as HTML
  if (cls) e.className = cls;
  return e;
}

async function ask(path, params) {
  const response = await fetch(path + "?" + new URLSearchParams(params));
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || ("status " + response.status));
  return body;
}

async function search(event) {
  event.preventDefault();
  const query = $("query").value;
  $("message").textContent = "";
  $("moments").replaceChildren();
  $("status").textContent = "searching ...";
  try {
    const found = await ask("/api/search", {q: query, top: 10});
    $("status").textContent = found.results.length + " of " + found.videos + " videos in " +
      found.ms.toFixed(1) + " ms (" + found.method + ")";
    const rows = found.results.map((hit, k) => {
      const row = element("tr");
      row.id = "hit-" + hit.id;
      row.append(element("td", String(k + 1)));
      const score = element("td", hit.score.toFixed(3), "score");
      const bar = element("div", undefined, "bar");
      bar.style.width = (Math.max(0, Math.min(1, hit.score)) * 6).toFixed(2) + "em";
      score.append(bar);
      row.append(score);
      const video = element("td");
      const open = element("button", hit.id, "open");
      open.title = "where in this video the query matches";
      open.addEventListener("click", () => moments(query, hit.id));
      video.append(open);
      row.append(video);
      const captions = element("td", undefined, "captions");
      const list = element("ul");
      for (const [lang, texts] of Object.entries(hit.captions)) {
        const item = element("li");
        item.append(element("span", lang + " ", "lang"), texts.join(" | "));
        list.append(item);
      }
      captions.append(list);
      row.append(captions);
      return row;
    });
    $("results").tBodies[0].replaceChildren(...rows);
    $("results").hidden = false;
  } catch (error) {
    $("status").textContent = "";
    $("results").hidden = true;
    $("message").textContent = error.message;
  }
}

async function moments(query, id) {
  $("moments").replaceChildren(element("p", "scoring the frames of " + id + " ..."));
  try {
    const m = await ask("/api/moments", {q: query, id: id});
    const [start, end, score] = m.best;
    let text = "video " + id + ": best segment frames " + start + "-" + end + " (end exclusive) of " +
      m.frames + ", score " + score.toFixed(3);
    if (m.true_span) text += "; the event the query names: frames " + m.true_span[0] + "-" + m.true_span[1];
    const image = element("img");
    image.alt = "score of each frame of " + id;
    image.src = m.plot;
    $("moments").replaceChildren(element("p", text), image);
    $("moments").scrollIntoView({block: "nearest"});
  } catch (error) {
    $("moments").replaceChildren();
    $("message").textContent = error.message;
  }
}

$("search").addEventListener("submit", search);
</script>
</body>
</html>
"""
