#!/usr/bin/env bash
# Look at the project's web UIs as a user would: screenshots of the MLflow UI (runs, compare,
# one run's overview, metric charts and images, the registered model and its latest version)
# and of the Prefect UI (the latest `training-pipeline` flow run and its artifacts), each
# checked to be a rendered page, not a spinner or a blank shell.
#
# Usage: bash scripts/ui_check.sh [--workspace DIR] [--out DIR] [--runs N] [--epochs E]
#                                 [--keep-open]
#   (no --workspace)  git clone the committed main into a temp dir and run the pipeline there
#                     N times (default 3; train.seed=0..N-1, train.epochs=E, default 4) against
#                     a fresh Prefect server; the clone is kept for later --workspace runs.
#   --workspace DIR   an existing workspace (a clone where the pipeline ran: mlflow.db, mlruns/);
#                     runs the pipeline only with --runs N.
#   --out DIR         screenshots and server logs (default: ui-shots/ in the repo root).
#   --keep-open       leave both servers running after the shots, until Ctrl-C.
# Needs: the repo's .venv (the project installed), Chromium (`chromium`, or $CHROMIUM).
# Both servers listen on 127.0.0.1 only, on free ports; Prefect keeps its database in its own
# PREFECT_HOME (next to a workspace this script made, else a temp dir), never in ~/.prefect.
# Exit status: 0 when every screenshot shows a rendered page, 1 otherwise, 2 on bad usage.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/.venv/bin
PY=$BIN/python
EXPERIMENT=vae-mnist
MODEL=mnist-vae
FLOW=training-pipeline
CHROMIUM=${CHROMIUM:-chromium}

workspace="" out="$ROOT/ui-shots" runs="" epochs=4 keep_open=0
scratch="" pids=() failures=0 started=$SECONDS

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 1; }
say() { printf '== %s (%ds)\n' "$*" $((SECONDS - started)); }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --workspace) workspace=$(cd "${2:?--workspace needs a folder}" && pwd); shift 2 ;;
      --out) out=${2:?--out needs a folder}; shift 2 ;;
      --runs) runs=${2:?--runs needs a number}; shift 2 ;;
      --epochs) epochs=${2:?--epochs needs a number}; shift 2 ;;
      --keep-open) keep_open=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; exit 2 ;;
    esac
  done
  [[ -z $runs || $runs =~ ^[0-9]+$ ]] || { echo "--runs: not a number: $runs" >&2; exit 2; }
  [[ $epochs =~ ^[1-9][0-9]*$ ]] || { echo "--epochs: not a number: $epochs" >&2; exit 2; }
}

cleanup() {
  local pid
  for pid in "${pids[@]}"; do  # each server leads its own process group (setsid)
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  [ -n "$scratch" ] && rm -rf "$scratch"
}

# free_port [PORT]: PORT when it is free on 127.0.0.1, else any free port
free_port() {
  "$PY" - "${1:-0}" <<'EOF'
import socket, sys
for port in (int(sys.argv[1]), 0):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            print(s.getsockname()[1])
            break
    except OSError:
        pass
EOF
}

# A workspace this script made sits next to its Prefect home and the ports it used last
# (links and images in the pipeline's Prefect artifacts name the MLflow server's port).
own_workspace() {
  [ "$(basename "$workspace")" = workspace ] && [ -d "$(dirname "$workspace")/prefect-home" ]
}

# pick_port NAME: the port NAME had the last time, when free, else any free one
pick_port() {
  local saved="" file
  file=$(dirname "$workspace")/ports
  if own_workspace && [ -f "$file" ]; then saved=$(sed -n "s/^$1=//p" "$file"); fi
  free_port "$saved"
}

save_ports() {
  own_workspace || return 0
  printf 'prefect=%s\nmlflow=%s\n' "$prefect_port" "$mlflow_port" >"$(dirname "$workspace")/ports"
}

# start_server NAME DIR CMD...: run in DIR, in its own process group, output in $out/NAME.log
start_server() {
  local name=$1 dir=$2; shift 2
  (cd "$dir" && exec setsid "$@" >"$out/$name.log" 2>&1 </dev/null) &
  pids+=("$!")
}

# wait_for NAME URL SECONDS: until URL answers 200, or fail with the server's log tail
wait_for() {
  local name=$1 url=$2 limit=$3 pid=${pids[-1]}
  for _ in $(seq "$limit"); do
    curl -sf -o /dev/null "$url" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  tail -n 20 "$out/$name.log" >&2
  die "$name did not answer at $url (log: $out/$name.log)"
}

make_workspace() {
  local base
  base=$(mktemp -d "${TMPDIR:-/tmp}/ui-check.XXXXXX")
  workspace=$base/workspace
  git clone -q "$ROOT" "$workspace"
  mkdir "$base/prefect-home"
  say "cloned $(git -C "$workspace" log -1 --format='%h %s' | cut -c1-70) into $workspace"
}

# The Prefect home next to a workspace this script made (its flow runs show), else a new one.
prefect_home() {
  if own_workspace; then
    echo "$(dirname "$workspace")/prefect-home"
  else
    mktemp -d "$scratch/prefect-home.XXXXXX"
  fi
}

start_prefect() {
  prefect_port=$(pick_port prefect)
  export PREFECT_HOME PREFECT_API_URL=http://127.0.0.1:$prefect_port/api
  PREFECT_HOME=$(prefect_home)
  export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
  start_server prefect-server "$scratch" \
    "$BIN/prefect" server start --host 127.0.0.1 --port "$prefect_port"
  wait_for prefect-server "$PREFECT_API_URL/health" 180
  say "Prefect server at http://127.0.0.1:$prefect_port (PREFECT_HOME=$PREFECT_HOME)"
}

start_mlflow() {
  mlflow_port=$(pick_port mlflow)
  mlflow_url=http://127.0.0.1:$mlflow_port
  export MLFLOW_ENABLE_TELEMETRY=false MLFLOW_UI_URL=$mlflow_url  # links the pipeline writes
  start_server mlflow-server "$scratch" "$BIN/mlflow" server --host 127.0.0.1 \
    --port "$mlflow_port" --workers 1 --backend-store-uri "sqlite:///$workspace/mlflow.db"
  wait_for mlflow-server "$mlflow_url/health" 180
  say "MLflow server at $mlflow_url"
}

# The clone's own code (PYTHONPATH): the venv's editable install points at $ROOT's tree.
run_pipeline() {
  local k
  for ((k = 0; k < runs; k++)); do
    say "pipeline run $((k + 1))/$runs: train.seed=$k train.epochs=$epochs"
    (cd "$workspace" && env -u MLFLOW_TRACKING_URI PYTHONPATH="$workspace" \
      "$BIN/vae-pipeline" run --force -S "train.epochs=$epochs" -S "train.seed=$k") \
      >"$out/pipeline-run-$k.log" 2>&1 || die "pipeline run failed: $out/pipeline-run-$k.log"
  done
}

# Prints KEY=VALUE lines: the experiment, its runs, the model's latest version, the latest
# flow run of the pipeline on this Prefect server and its summary artifact.
find_ids() {
  "$PY" - "$workspace" "$EXPERIMENT" "$MODEL" "$FLOW" "$PREFECT_API_URL" \
    <<'EOF' 2>"$out/find-ids.log"
import json, sys, urllib.request
import warnings; warnings.simplefilter("ignore")
from mlflow import MlflowClient
workspace, experiment, model, flow, api = sys.argv[1:]
client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
exp = client.get_experiment_by_name(experiment)
runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                          max_results=10) if exp else []
versions = client.search_model_versions(f"name='{model}'")
latest = max(versions, key=lambda v: int(v.version)) if versions else None
def post(path, body):
    req = urllib.request.Request(api + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))
flow_runs = post("/flow_runs/filter", {"flows": {"name": {"any_": [flow]}},
                                       "sort": "START_TIME_DESC", "limit": 1})
artifacts = post("/artifacts/filter", {
    "artifacts": {"key": {"any_": ["training-pipeline-summary"]},
                  "flow_run_id": {"any_": [flow_runs[0]["id"]]}},
    "sort": "CREATED_DESC", "limit": 1}) if flow_runs else []
images = post("/artifacts/filter", {
    "artifacts": {"type": {"any_": ["image"]}, "flow_run_id": {"any_": [flow_runs[0]["id"]]}},
    "sort": "KEY_DESC", "limit": 1}) if flow_runs else []
print(f"exp_id={exp.experiment_id if exp else ''}")
print(f"run_ids={','.join(r.info.run_id for r in runs)}")
print(f"run_names={','.join(r.info.run_name for r in runs[:3])}")
logged = [f.path.split("/")[-1].split("+step+")[0] for f in client.list_artifacts(
    runs[0].info.run_id, "images") if "+step+" in f.path] if runs else []  # log_image files
print(f"image_keys={'|'.join(sorted(set(logged)))}")
print(f"version={latest.version if latest else ''}")
print(f"flow_run_id={flow_runs[0]['id'] if flow_runs else ''}")
print(f"flow_run_name={flow_runs[0]['name'] if flow_runs else ''}")
print(f"artifact_id={artifacts[0]['id'] if artifacts else ''}")
print(f"image_artifact_id={images[0]['id'] if images else ''}")
print(f"image_artifact_key={images[0]['key'] if images else ''}")
EOF
}

load_ids() {
  local key value
  while IFS='=' read -r key value; do
    case $key in
      exp_id|run_ids|run_names|image_keys|version|flow_run_id|flow_run_name|artifact_id|\
      image_artifact_id|image_artifact_key)
        printf -v "$key" '%s' "$value" ;;
    esac
  done < <(find_ids)
  [ -n "${exp_id:-}" ] || die "no experiment $EXPERIMENT in $workspace/mlflow.db, or the" \
    "look-up failed: $out/find-ids.log"
  [ -n "${run_ids:-}" ] || die "experiment $EXPERIMENT has no runs"
  [ -n "${version:-}" ] || die "no version of the registered model $MODEL"
  run_id=${run_ids%%,*} run_name=${run_names%%,*}
  say "experiment $exp_id, $(tr ',' '\n' <<<"$run_ids" | wc -l) runs, latest $run_name" \
    "($run_id), $MODEL v$version, flow run ${flow_run_name:-none}"
}

# The Chromium driver: DevTools protocol over a websocket (the venv's `websockets`). Reads
# lines NAME<TAB>URL<TAB>TEXTS<TAB>MODE<TAB>SCROLL; prints "ok NAME SECONDS" or "fail NAME
# WHY". A page is ready when each of TEXTS ('|'-separated; <img>: an image in view) is on it,
# no spinner or skeleton
# is in view, its images have loaded and its text has not changed for 1.5 s. MODE fresh: a
# first visit; returning: MLflow's assistant panel closed and its "Model training" view on
# (what one click each does, remembered in localStorage). SCROLL: once the first of TEXTS is
# there, page down until an element with exactly that text is rendered, scroll it to the
# top, then wait for all of TEXTS. Each page gets its own browser context.
write_driver() {
  cat >"$scratch/shoot.py" <<'EOF'
import base64, json, os, subprocess, sys, tempfile, time
from websockets.sync.client import connect

OUT, CHROMIUM = sys.argv[1], os.environ.get("CHROMIUM", "chromium")
WIDTH, HEIGHT, TIMEOUT = 1600, 1100, 90
RETURNING = """try { if (!sessionStorage.getItem('ui-check')) {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  sessionStorage.setItem('ui-check', '1'); } } catch (e) {}"""
PROBE = """(() => {
  const seen = (el) => { const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.bottom > 0 && r.top < innerHeight
      && getComputedStyle(el).visibility !== 'hidden'; };
  const busy = [...document.querySelectorAll('[class*="spin-spinning"], [class*="spin-dot"],'
    + '[class*="animate-spin"], [class*="animate-pulse"], [class*="skeleton" i],'
    + '[class*="spinner" i], [class*="loading-icon" i], [aria-busy="true"],'
    + '[data-testid*="spinner" i], [data-testid*="loading" i]')].filter(seen)
    .map(el => String(el.getAttribute('class') || el.getAttribute('role')).slice(0, 50));
  const text = document.body ? document.body.innerText : '';
  return JSON.stringify({state: document.readyState, busy: busy.slice(0, 2), text: text,
    images: [...document.images].filter(seen)
      .filter(i => !i.complete || i.naturalWidth === 0).length,
    shown: [...document.images].filter(seen).filter(i => i.naturalWidth > 0).length});
})()"""
SEEK = """((t) => { const el = document.evaluate(
  `//*[normalize-space(text())=${JSON.stringify(t)}]`, document, null,
  XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;
  if (el) { el.scrollIntoView({block: 'start'}); return 'found'; }
  let moved = false;  // not rendered yet: page down every scroll box (lazy sections)
  for (const box of [document.scrollingElement, ...document.querySelectorAll('*')]) {
    if (!box || box.scrollHeight <= box.clientHeight + 10) continue;
    if (box !== document.scrollingElement
        && !['auto', 'scroll'].includes(getComputedStyle(box).overflowY)) continue;
    const before = box.scrollTop; box.scrollTop += box.clientHeight * 0.8;
    moved = moved || box.scrollTop !== before; }
  return moved ? 'moved' : 'end'; })"""


class Browser:
    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-breakpad", "--no-first-run", f"--window-size={WIDTH},{HEIGHT}",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        try:
            for _ in range(600):
                if os.path.exists(port_file) and len(open(port_file).read().split()) == 2:
                    break
                time.sleep(0.1)
            port, path = open(port_file).read().split()
            self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=60)
        except Exception:
            self.proc.kill()
            raise
        self.last = 0

    def send(self, method, session=None, **params):
        self.last += 1
        self.ws.send(json.dumps({"id": self.last, "method": method, "params": params,
                                 **({"sessionId": session} if session else {})}))
        while True:
            reply = json.loads(self.ws.recv(timeout=120))
            if reply.get("id") == self.last:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply["result"]

    def close(self):
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - it goes either way
            self.proc.kill()
        subprocess.run(["rm", "-rf", self.profile], check=False)


def settle(b, sid, texts, deadline):
    """Poll until the page is ready (see above); returns '' or why it is not."""
    last, stable, why = None, 0, "timed out"
    while time.monotonic() < deadline and stable < 3:
        time.sleep(0.5)
        value = b.send("Runtime.evaluate", sid, expression=PROBE, returnByValue=True)
        probe = json.loads(value["result"].get("value") or "{}")
        text = probe.get("text", "")
        missing = [t for t in texts if t != "<img>" and t not in text]
        why = (f"text not on the page: {missing}" if missing
               else f"still loading: {probe['busy']}" if probe.get("busy")
               else "no image in view" if "<img>" in texts and not probe.get("shown")
               else f"{probe['images']} images not loaded" if probe.get("images")
               else "page not complete" if probe.get("state") != "complete" else "")
        stable = stable + 1 if not why and text == last else 0
        last = text
    return "" if stable >= 3 else why


def seek(b, sid, heading):
    """Scroll the heading to the top, paging down until it is rendered; '' or why not."""
    for _ in range(60):
        where = b.send("Runtime.evaluate", sid, expression=f"{SEEK}({json.dumps(heading)})",
                       returnByValue=True)["result"].get("value")
        if where == "found":
            return ""
        if where == "end":
            break
        time.sleep(0.7)
    return f"no {heading!r} on the page"


def shoot(b, name, url, texts, mode, scroll):
    context = b.send("Target.createBrowserContext")["browserContextId"]
    target = b.send("Target.createTarget", url="about:blank", browserContextId=context)
    sid = b.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
    started = time.monotonic()
    try:
        b.send("Page.enable", sid)
        b.send("Emulation.setDeviceMetricsOverride", sid, width=WIDTH, height=HEIGHT,
               deviceScaleFactor=1, mobile=False)
        if mode == "returning":
            b.send("Page.addScriptToEvaluateOnNewDocument", sid, source=RETURNING)
        b.send("Page.navigate", sid, url=url)
        why = settle(b, sid, texts[:1] if scroll else texts, started + TIMEOUT)
        if scroll and not why:
            why = seek(b, sid, scroll) or settle(b, sid, texts, started + TIMEOUT)
        time.sleep(0.5)  # chart transitions
        png = b.send("Page.captureScreenshot", sid, format="png")["data"]
        with open(os.path.join(OUT, name), "wb") as fh:
            fh.write(base64.b64decode(png))
        return why, time.monotonic() - started
    finally:
        b.send("Target.closeTarget", targetId=target["targetId"])
        b.send("Target.disposeBrowserContext", browserContextId=context)


browser = Browser()
try:
    for line in sys.stdin:
        name, url, texts, mode, scroll = line.rstrip("\n").split("\t")
        try:
            why, seconds = shoot(browser, name, url, [t for t in texts.split("|") if t],
                                 mode, scroll)
        except Exception as exc:  # noqa: BLE001 - one broken page must not stop the others
            why, seconds = f"{type(exc).__name__}: {exc}", 0.0
        print(f"fail {name} {why}" if why else f"ok {name} {seconds:.1f}", flush=True)
finally:
    browser.close()
EOF
}

# check_png FILE: a real page has many colours, no single one covering nearly all of it
check_png() {
  "$PY" - "$1" <<'EOF'
import os, sys
from PIL import Image
path = sys.argv[1]
if not os.path.exists(path) or os.path.getsize(path) < 15000:
    sys.exit(f"{os.path.getsize(path) if os.path.exists(path) else 0} bytes")
image = Image.open(path).convert("RGB")
colours = image.getcolors(maxcolors=1 << 22)
top = max(count for count, _ in colours) / (image.width * image.height)
if len(colours) < 64 or top > 0.97:
    sys.exit(f"nearly blank: {len(colours)} colours, one covers {top:.0%}")
EOF
}

# The pages: NAME, URL, texts that must be on it, mode, heading to scroll to, what it shows.
page_list() {
  local m=$mlflow_url/#
  local run=$m/experiments/$exp_id/runs/$run_id
  local ids json_runs
  ids=$(tr ',' '\n' <<<"$run_ids" | head -n 5 | paste -sd, -)
  json_runs=[\"${ids//,/\",\"}\"]
  local n=$(( $(tr -cd ',' <<<"$ids" | wc -c) + 1 ))
  local names=${run_names//,/|}
  row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@"; }
  row mlflow-experiment-first-visit.png "$m/experiments/$exp_id" "$EXPERIMENT" fresh "" \
    "experiment $EXPERIMENT as a first-time visitor lands on it"
  row mlflow-runs-list.png "$m/experiments/$exp_id/runs" "$names" returning "" \
    "runs list of $EXPERIMENT"
  row mlflow-runs-charts.png "$m/experiments/$exp_id/runs?compareRunsMode=CHART" \
    "$names|Model metrics" returning "" "runs of $EXPERIMENT, chart view (metrics side by side)"
  row mlflow-compare-runs.png "$m/compare-runs?runs=$json_runs&experiments=[\"$exp_id\"]" \
    "Comparing $n Runs" returning "" "compare view of the latest $n runs"
  row mlflow-compare-runs-metrics.png "$m/compare-runs?runs=$json_runs&experiments=[\"$exp_id\"]" \
    "Comparing $n Runs" returning Metrics "compare view, metrics table"
  row mlflow-run-overview.png "$run" "$run_name|Metrics" returning "" \
    "run $run_name overview (params, metrics, tags)"
  row mlflow-run-model-metrics.png "$run/model-metrics" "$run_name|Model metrics" returning "" \
    "run $run_name metric charts"
  if [ -n "$image_keys" ]; then  # log_image images are cards among the metric charts
    row mlflow-run-logged-images.png "$run/model-metrics" "$run_name|$image_keys|<img>" returning \
      "${image_keys%%|*}" "run $run_name log_image images (${image_keys//|/, })"
  fi
  row mlflow-run-artifacts.png "$run/artifacts" "$run_name|loss_curve.png" returning "" \
    "run $run_name artifacts tab"
  row mlflow-run-artifact-loss-curve.png "$run/artifacts/loss_curve.png" \
    "$run_name|loss_curve.png|<img>" returning "" "run $run_name artifact loss_curve.png"
  row mlflow-run-artifact-samples.png "$run/artifacts/evaluation/samples.png" \
    "$run_name|samples.png|<img>" returning "" "run $run_name artifact evaluation/samples.png"
  row mlflow-registered-model.png "$m/models/$MODEL" "$MODEL|Version $version" returning "" \
    "registered model $MODEL"
  row mlflow-registered-model-versions.png "$m/models/$MODEL" "$MODEL|Version $version" \
    returning Versions "registered model $MODEL, versions table"
  row mlflow-model-version.png "$m/models/$MODEL/versions/$version" "Version $version" \
    returning "" "model version $MODEL v$version"
  [ -n "$flow_run_id" ] || return 0
  local p=http://127.0.0.1:$prefect_port
  row prefect-flow-run.png "$p/v2/runs/flow-run/$flow_run_id" "$flow_run_name|$FLOW" fresh "" \
    "Prefect flow run $flow_run_name (default UI), logs tab"
  row prefect-flow-run-artifacts.png "$p/v2/runs/flow-run/$flow_run_id?tab=Artifacts" \
    "$flow_run_name|training-pipeline-summary" fresh "" \
    "Prefect flow run $flow_run_name, artifacts tab"
  if [ -n "$artifact_id" ]; then
    row prefect-summary-artifact.png "$p/v2/artifacts/artifact/$artifact_id" \
      "training-pipeline-summary|$flow_run_name" fresh "" \
      "Prefect artifact training-pipeline-summary (the run's summary table)"
  fi
  if [ -n "$image_artifact_id" ]; then  # an image the Prefect UI loads from the MLflow server
    row prefect-image-artifact.png "$p/v2/artifacts/artifact/$image_artifact_id" \
      "$image_artifact_key|$flow_run_name|<img>" fresh "" \
      "Prefect image artifact $image_artifact_key"
  fi
  row prefect-flow-run-v1.png "$p/runs/flow-run/$flow_run_id" "$flow_run_name|$FLOW" fresh "" \
    "Prefect flow run $flow_run_name, V1 UI (the link the pipeline logs)"
}

take_shots() {
  local pages result name why what reported=0
  pages=$(page_list)
  if [ -z "$flow_run_id" ]; then
    echo "skip prefect-flow-run*.png: no $FLOW flow run on this Prefect server (the runs" \
      "in $workspace were recorded on another one; pass --runs N to make new ones)"
  fi
  write_driver
  while read -r result name why; do
    what=$(awk -F'\t' -v n="$name" '$1 == n { print $6 }' <<<"$pages")
    if [ "$result" = ok ] && why=$(check_png "$out/$name" 2>&1); then
      echo "shot $out/$name $what"
    else
      echo "FAIL $out/$name $what: ${why:-blank}"
      failures=$((failures + 1))
    fi
    reported=$((reported + 1))
  done < <(cut -f1-5 <<<"$pages" |
    CHROMIUM=$CHROMIUM TMPDIR=$scratch "$PY" "$scratch/shoot.py" "$out")
  if [ "$reported" -lt "$(wc -l <<<"$pages")" ]; then
    echo "FAIL the browser driver stopped after $reported pages"
    failures=$((failures + 1))
  fi
}

print_urls() {
  echo "MLflow UI:  $mlflow_url/#/experiments/$exp_id/runs?workflowType=machine_learning"
  echo "            $mlflow_url/#/models/$MODEL"
  echo "Prefect UI: http://127.0.0.1:$prefect_port/v2/runs${flow_run_id:+/flow-run/$flow_run_id}"
  echo "workspace:  $workspace (again: bash scripts/ui_check.sh --workspace $workspace)"
  [ "$keep_open" = 1 ] || echo "(both servers stop now; --keep-open keeps them up)"
}

main() {
  parse_args "$@"
  [ -x "$BIN/vae-pipeline" ] || die "no $BIN/vae-pipeline: install the project into .venv"
  command -v "$CHROMIUM" >/dev/null || die "no $CHROMIUM on PATH (set CHROMIUM=...)"
  mkdir -p "$out" && out=$(cd "$out" && pwd)
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/ui-check-scratch.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  if [ -z "$workspace" ]; then
    make_workspace
    runs=${runs:-3}
  else
    [ -f "$workspace/mlflow.db" ] || [ -n "$runs" ] || die "no mlflow.db in $workspace"
    runs=${runs:-0}
  fi
  start_prefect
  start_mlflow
  save_ports
  run_pipeline
  load_ids
  take_shots
  say "done: $failures failed"
  print_urls
  if [ "$keep_open" = 1 ]; then
    echo "servers stay up until Ctrl-C"
    wait
  fi
  [ "$failures" = 0 ]
}

main "$@"
