# The deploy-dev stage's remote library: POSIX sh, run as `sh -s` on the DEV server.
#
# pipeline.tools.ssh.remote_script puts shell-quoted, validated values above this
# text and one entry point (a function at the end of this file) below it. Every
# step prints `@deploy <step> <status> <text>` so the runner knows which step
# failed. Exit codes: ssh.RemoteExit.
#
# Files in the deploy directory:
#   .env             what compose reads; only our variables are replaced
#   $ROLLBACK        the .env of the last verified deploy (restored on failure)
#   .deploy-pending  the .env in place has not passed a health check yet
#   .deploy.lock/    mkdir lock; `owner` names the deploy; mtime is its heartbeat
#   .deploy.log      the output of the last deploy_all session; .deploy-last its exit status

trap '' HUP PIPE  # a dropped connection must not stop a deploy halfway
PENDING=.deploy-pending
LOCK=.deploy.lock
PULL_CONFIG=

mark() { printf '@deploy %s %s %s\n' "$1" "$2" "${3:-}"; }

now_ns() {
  ns=$(date +%s%N)
  case $ns in *N) ns=$(( $(date +%s) * 1000000000 )) ;; esac
  echo "$ns"
}

seconds_since() {
  elapsed=$(( ($(now_ns) - $1) / 1000000 ))
  printf '%d.%03d' $((elapsed / 1000)) $((elapsed % 1000))
}

compose() {
  if [ -n "$COMPOSE_FILE_ARG" ]; then $COMPOSE -f "$COMPOSE_FILE_ARG" "$@"; else $COMPOSE "$@"; fi
}

env_refs() { grep -E "^($ENV_NAMES)=" "$1" 2>/dev/null | tr '\n' ' '; }

copy_atomic() {
  tmp="$2.tmp.$$"
  if cp -p "$1" "$tmp" && mv -f "$tmp" "$2"; then return 0; fi
  rm -f "$tmp"
  return 1
}

# --- the lock ------------------------------------------------------------------------

age_of() {
  modified=$(stat -c %Y "$1" 2>/dev/null) || { echo 0; return; }
  echo $(( $(date +%s) - modified ))
}

holder() { tr '\n' ' ' < "$LOCK/owner" 2>/dev/null || echo 'unknown (no owner file)'; }

break_if_stale() {
  mkdir "$LOCK.break" 2>/dev/null || {
    [ "$(age_of "$LOCK.break")" -ge "$STALE" ] && rmdir "$LOCK.break" 2>/dev/null
    return
  }
  age=$(age_of "$LOCK")
  if [ "$age" -ge "$STALE" ]; then
    mark lock warn "breaking a stale deploy lock (no heartbeat for ${age}s): $(holder)"
    rm -rf "$LOCK" 2>/dev/null
  fi
  rmdir "$LOCK.break"
  if [ -d "$LOCK" ] && [ "$(age_of "$LOCK")" -ge "$STALE" ]; then
    mark lock fail "cannot remove the stale lock $DEPLOY_DIR/$LOCK as $(id -un): remove it by hand"
    exit 66
  fi
}

lock_take() {
  mark lock begin "$DEPLOY_DIR/$LOCK"
  waited=0
  while ! mkdir "$LOCK" 2>/dev/null; do
    if [ "$(age_of "$LOCK")" -ge "$STALE" ]; then break_if_stale; continue; fi
    if [ "$waited" -ge "$WAIT" ]; then
      mark lock fail "another deploy held the lock for ${WAIT}s: $(holder)"
      exit 66
    fi
    [ "$waited" -eq 0 ] && mark lock info "waiting: another deploy holds the lock: $(holder)"
    sleep 1
    waited=$((waited + 1))
  done
  printf '%s\n' "token=$TOKEN" "owner=$OWNER" "pid=$$" \
    "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$LOCK/owner"
  printf '%s\n' "$COMPOSE" > "$LOCK/compose"
  mark lock ok "taken after ${waited}s"
}

lock_is_mine() { grep -qxF "token=$TOKEN" "$LOCK/owner" 2>/dev/null; }

lock_beat() { touch "$LOCK" 2>/dev/null; }

lock_mine() {
  if ! lock_is_mine; then
    mark lock fail "the deploy lock is no longer this deploy's (broken as stale?): $(holder)"
    exit 66
  fi
  lock_beat
}

lock_release() {
  if lock_is_mine; then rm -rf "$LOCK"; mark unlock ok; else mark unlock warn "lock not ours: left alone"; fi
}

# --- the steps -----------------------------------------------------------------------

refuse() { mark preflight fail "$1"; exit 65; }

enter() {
  cd "$DEPLOY_DIR" 2>/dev/null || refuse "cannot enter $DEPLOY_DIR as $(id -un)"
  # The compose command preflight chose for this deploy (see pick_compose).
  if [ -f "$LOCK/compose" ] && lock_is_mine; then COMPOSE=$(cat "$LOCK/compose"); fi
}

pick_compose() {
  # Compose v1 servers have only docker-compose; both accept every command used here.
  if [ "$COMPOSE" = "docker compose" ] && ! docker compose version >/dev/null 2>&1 &&
    command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=docker-compose
    mark preflight info "docker compose is not installed: using docker-compose"
  fi
}

preflight() {
  mark preflight begin "$DEPLOY_DIR"
  [ -d "$DEPLOY_DIR" ] || refuse "deploy directory $DEPLOY_DIR does not exist on the server (PIPELINE_DEPLOY_DIR)"
  enter
  if [ -n "$COMPOSE_FILE_ARG" ]; then
    [ -f "$COMPOSE_FILE_ARG" ] || refuse "no $COMPOSE_FILE_ARG in $DEPLOY_DIR (PIPELINE_DEPLOY_COMPOSE_FILE)"
  else
    found=
    for name in compose.yaml compose.yml docker-compose.yaml docker-compose.yml; do
      [ -f "$name" ] && found=$name
    done
    [ -n "$found" ] || refuse "no compose file (compose.yaml or docker-compose.yml) in $DEPLOY_DIR (PIPELINE_DEPLOY_DIR)"
  fi
  command -v docker >/dev/null 2>&1 || refuse "docker is not installed on the server"
  known=$(compose config --services 2>/dev/null) || { pick_compose; known=$(compose config --services 2>/dev/null); } ||
    refuse "compose cannot read the project in $DEPLOY_DIR: $(compose config --services 2>&1 >/dev/null | tail -n 1)"
  for service in $SERVICES $WORKERS; do
    printf '%s\n' "$known" | grep -qxF -- "$service" ||
      refuse "service $service is not in the compose file (it defines: $(echo $known))"
  done
  if [ -n "$HEALTH_URL" ] && ! command -v curl >/dev/null 2>&1 && ! command -v wget >/dev/null 2>&1; then
    refuse "neither curl nor wget on the server for the health check; set PIPELINE_DEPLOY_HEALTH_FROM=runner"
  fi
  mark preflight ok "services: $(echo $known)"
}

pull_failed() {
  mark pull fail "$1: $(tail -n 1 "$PULL_CONFIG/err" 2>/dev/null)"
  rm -rf "$PULL_CONFIG"
  return 1
}

pull_image() {
  mark pull begin "$IMAGE_REF"
  PULL_CONFIG=$(mktemp -d) || { mark pull fail "mktemp -d failed on the server"; return 1; }
  trap 'rm -rf "$PULL_CONFIG"' EXIT
  registry_login 2>"$PULL_CONFIG/err" || { pull_failed "docker login to $REGISTRY failed"; return 1; }
  DOCKER_CONFIG="$PULL_CONFIG" docker pull -q "$IMAGE_REF" >/dev/null 2>"$PULL_CONFIG/err" ||
    { pull_failed "docker pull failed"; return 1; }
  docker tag "$IMAGE_REF" "$TAG_REF" 2>"$PULL_CONFIG/err" || { pull_failed "docker tag failed"; return 1; }
  rm -rf "$PULL_CONFIG"
  mark pull ok "$IMAGE_REF (tagged $TAG_REF)"
}

report_running() {
  ids=$(compose ps -q $SERVICES 2>/dev/null)
  if [ -z "$ids" ]; then mark running info "no containers"; return 0; fi
  docker inspect --format '{{.Name}} {{.Config.Image}} {{.State.Status}}' $ids 2>/dev/null |
    while read -r name image state; do
      mark running info "${name#/} $image $state"
      [ "$state" = running ] || mark running warn "${name#/} is $state (if the health check passed, something else answers on its URL)"
    done
}

save_rollback() {
  mark rollback-file begin "$ROLLBACK"
  report_running
  if [ -f "$PENDING" ]; then
    mark rollback-file warn "the last deploy did not finish verified ($(head -n 1 "$PENDING")): keeping $ROLLBACK, the last verified version"
  elif [ -f .env ]; then
    copy_atomic .env "$ROLLBACK" || { mark rollback-file fail "cannot write $ROLLBACK"; return 1; }
  else
    rm -f "$ROLLBACK"
  fi
  if [ -f "$ROLLBACK" ]; then mark rollback-file ok "$(env_refs "$ROLLBACK")"; else mark rollback-file ok "none: nothing deployed before"; fi
}

write_env() {
  mark env begin
  printf '%s\n' "$IMAGE_REF token=$TOKEN $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$PENDING" ||
    { mark env fail "cannot write $PENDING"; return 1; }
  tmp=".env.tmp.$$"
  if [ -f .env ]; then
    cp -p .env "$tmp" && { grep -Ev "^($ENV_NAMES)=" .env; ENV_LINES; } > "$tmp"
  else
    ENV_LINES > "$tmp"
  fi && mv -f "$tmp" .env && { mark env ok "$(env_refs .env)"; return 0; }
  rm -f "$tmp"
  mark env fail "cannot write .env in $DEPLOY_DIR"
  return 1
}

up_services() {
  mark "$1" begin "${SERVICES:-all services}"
  started=$(now_ns)
  compose up -d $SERVICES || { mark "$1" fail "docker compose up -d failed"; return 1; }
  mark "$1" ok "compose took $(seconds_since "$started")s"
}

probe() {
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null -w '%{http_code}' --max-time "$HEALTH_TIMEOUT" "$HEALTH_URL" 2>/dev/null
  else
    wget -q -S -O /dev/null -T "$HEALTH_TIMEOUT" "$HEALTH_URL" 2>&1 | awk '/^ *HTTP\//{c=$2} END{print c}'
  fi
}

health_server() {
  mark "$1" begin "$HEALTH_URL (up to $HEALTH_TRIES tries, ${HEALTH_INTERVAL}s apart)"
  try=1
  while :; do
    code=$(probe)
    if [ "$code" = 200 ]; then mark "$1" ok "HTTP 200 on try $try"; return 0; fi
    if [ "$try" -ge "$HEALTH_TRIES" ]; then mark "$1" fail "no HTTP 200 after $try tries (last: ${code:-none})"; return 1; fi
    mark "$1" info "try $try/$HEALTH_TRIES: HTTP ${code:-none}"
    lock_beat
    sleep "$HEALTH_INTERVAL"
    try=$((try + 1))
  done
}

restore_previous() {
  mark rollback begin "$ROLLBACK"
  if [ ! -f "$ROLLBACK" ]; then
    mark rollback fail "nothing to roll back to (no verified deploy recorded in $ROLLBACK): the failed version is left as it is"
    return 2
  fi
  copy_atomic "$ROLLBACK" .env || { mark rollback fail "cannot restore .env from $ROLLBACK"; return 1; }
  up_services rollback-up || { mark rollback fail "docker compose up -d of the previous version failed"; return 1; }
  mark rollback ok "restored $(env_refs .env)"
}

restart_workers() {
  [ -n "$WORKERS" ] || return 0
  mark workers begin "$WORKERS"
  compose restart $WORKERS || { mark workers fail "docker compose restart $WORKERS failed"; return 1; }
  mark workers ok
}

settle() {
  [ "$1" = healthy ] && rm -f "$PENDING"
  report_running
  lock_release
}

# --- entry points --------------------------------------------------------------------

prepare() {
  preflight
  lock_take
  pull_image || { lock_release; exit 67; }
  save_rollback || { lock_release; exit 67; }
}

deploy_finish() {
  enter
  lock_mine
  if restart_workers; then settle healthy; exit 0; fi
  settle healthy
  exit 72
}

roll_back_on_server() {
  restore_previous
  case $? in
    0) if health_server rollback-health; then settle healthy; exit 68; fi ;;
    2) settle unhealthy; exit 70 ;;
  esac
  settle unhealthy
  exit 69
}

deploy_all() {
  prepare
  if write_env && up_services up && health_server health; then deploy_finish; fi
  roll_back_on_server
}

deploy_up() {
  prepare
  write_env && up_services up && { report_running; exit 0; }
  exit 71
}

deploy_rollback() {
  enter
  lock_mine
  restore_previous
  case $? in
    0) exit 0 ;;
    2) settle unhealthy; exit 70 ;;
  esac
  settle unhealthy
  exit 69
}

settle_healthy() { enter; lock_mine; settle healthy; }

settle_unhealthy() { enter; lock_mine; settle unhealthy; }

result_ready() { grep -qxF "token=$TOKEN" .deploy-last 2>/dev/null; }

deploy_follow() {
  enter
  mark follow begin "waiting for the deploy script to finish on the server"
  pid=$(lock_is_mine && sed -n 's/^pid=//p' "$LOCK/owner")
  waited=0
  until result_ready; do
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
      [ "$waited" -ge 10 ] && { mark follow fail "the deploy script on the server ended without a result"; exit 1; }
      waited=$((waited + 1))
    fi
    sleep 1
  done
  grep '^@deploy ' .deploy.log 2>/dev/null
  status=$(sed -n 's/^status=//p' .deploy-last)
  mark follow ok "the deploy script finished on the server with status $status"
  exit "${status:-1}"
}

deploy_recover() {
  enter
  lock_is_mine || { mark recover info "the lock is not ours: nothing to recover"; exit 0; }
  pid=$(sed -n 's/^pid=//p' "$LOCK/owner")
  while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do lock_beat; sleep 1; done
  mark recover ok "the interrupted session has ended"
  deploy_rollback
}

# --- running an entry point --------------------------------------------------------------

# Every line goes through this relay, which ignores write errors: when the connection
# drops, the relay keeps reading, so docker and compose never get EPIPE halfway. It also
# keeps a copy, for deploy_follow after a dropped connection.
relay() {
  while IFS= read -r line; do
    printf '%s\n' "$line" >> "$1"
    printf '%s\n' "$line" 2>/dev/null
  done
}

keep_result() {
  cp "$2" "$DEPLOY_DIR/.deploy.log" 2>/dev/null
  printf '%s\n' "token=$TOKEN" "status=$1" "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    > "$DEPLOY_DIR/.deploy-last" 2>/dev/null
}

main() {
  status_file=$(mktemp) && log_file=$(mktemp) || { mark start fail "mktemp failed on the server"; exit 1; }
  { ("$1"); echo "$?" > "$status_file"; } 2>&1 | relay "$log_file"
  status=$(cat "$status_file")
  status=${status:-1}
  if [ "$1" = deploy_all ] && [ "$status" != 65 ]; then keep_result "$status" "$log_file"; fi
  rm -f "$status_file" "$log_file"
  exit "$status"
}
