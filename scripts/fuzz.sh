#!/usr/bin/env bash
# The fuzz targets (fuzz/, README "Fuzzing"): builds every cargo-fuzz target, checks the fuzz crate's own unit
# tests, then runs each target for a fixed budget from a copy of its committed seed corpus (the repo stays clean).
# A crash, a timeout or a failed invariant of any target fails the run; its input is kept and printed.
# Closes with one line: `fuzz: N passed, M failed` (one per target).
#
#   FUZZ_SECONDS=20          budget per target (libFuzzer -max_total_time)
#   FUZZ_TARGETS="a b"       only these targets
#   FUZZ_ARTIFACTS=DIR       where crashing inputs are kept (default: a temp dir, printed)
#   CARGO_TARGET_DIR=DIR     build dir (default: /var/cache/meshcni/fuzz-target, outside the repo)
#   FUZZ_STABLE=1            use the stable toolchain with RUSTC_BOOTSTRAP=1 even when nightly is installed
#
# Installs what it needs: a C++ compiler (libFuzzer is C++), and cargo-fuzz into /var/cache/meshcni/cargo-fuzz-<ver>
# (`cargo install --locked`, reused when present). cargo-fuzz wants a nightly compiler: `cargo +nightly fuzz` when a
# nightly toolchain is installed, otherwise the stable one with RUSTC_BOOTSTRAP=1 (said in the output; checked here:
# stable builds and runs these targets so; without it stable refuses cargo-fuzz's default ASan build).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-20}
cache=/var/cache/meshcni
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/fuzz-target}
export CARGO_INCREMENTAL=0
all_targets="cni_request plugin_config pod_redirect prev_result conflist_edit kubeconfig nftables_render agent_socket"
targets=${FUZZ_TARGETS:-$all_targets}

if ! command -v c++ >/dev/null 2>&1; then
  echo "fuzz: installing g++ (libFuzzer is C++)"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends g++ >/dev/null
fi

fuzz_root=$cache/cargo-fuzz-$CARGO_FUZZ_VERSION
if ! "$fuzz_root/bin/cargo-fuzz" --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $fuzz_root"
  mkdir -p "$cache"
  rm -rf "$fuzz_root.tmp"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$fuzz_root.tmp" --quiet
  rm -rf "$fuzz_root"
  mv "$fuzz_root.tmp" "$fuzz_root"
fi
export PATH="$fuzz_root/bin:$PATH"

if [ -z "${FUZZ_STABLE:-}" ] && rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
  echo "fuzz: toolchain $(rustup run nightly rustc --version)"
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
  why="no nightly toolchain installed"
  [ -n "${FUZZ_STABLE:-}" ] && why="FUZZ_STABLE is set"
  echo "fuzz: $why: using $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts=${FUZZ_ARTIFACTS:-$work/artifacts}

# No sanitizer: the fuzzed code is safe Rust (the invariants and overflow checks find its bugs), and ASan would
# double the build and halve the executions per second. Release with debug assertions (cargo-fuzz's default).
# The build dir is shared by every checkout on the machine (a CI clone, a developer's worktree): build and copy the
# binaries under a lock, so that another checkout's build cannot replace them before they run.
mkdir -p "$CARGO_TARGET_DIR"
exec 9>"$CARGO_TARGET_DIR/.meshcni-fuzz.lock"
flock 9
start=$(date +%s)
(cd fuzz && cargo "${toolchain[@]}" fuzz build --sanitizer none)
# cargo-fuzz has no --locked: the committed fuzz/Cargo.lock must have been current (the tests below are --locked).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && ! git diff --quiet -- fuzz/Cargo.lock; then
  echo "fuzz: the build changed fuzz/Cargo.lock: commit the updated lock file" >&2
  exit 1
fi
# What failed, from the target's log, and its input (the head of each: `| head` may cut a writer short, which
# pipefail would turn into the end of the script).
show_failure() (
  set +o pipefail
  grep -aE 'panicked at|ERROR: libFuzzer|Test unit written' "$2" | head -10
  sed -n '/panicked at/,/^note:/p' "$2" | head -40
  for f in "$artifacts/$1"/*; do
    [ -f "$f" ] || continue
    echo "fuzz: $1: crashing input $f (replay: cd fuzz && cargo +nightly fuzz run $1 FILE):"
    head -c 1024 "$f" | od -An -c | head -20
  done
)
bin_dir="$work/bin"
mkdir -p "$bin_dir"
for t in $targets; do
  cp "$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release/$t" "$bin_dir/"
done
echo "fuzz: built in $(( $(date +%s) - start )) s"

passed=0
failed=0
# The fuzz crate's own tests (the literal reader and the input formats the invariants rest on).
if ! (cd fuzz && cargo "${toolchain[@]}" test --locked --lib --quiet); then
  echo "fuzz: the fuzz crate's unit tests FAILED"
  failed=$((failed + 1))
fi
flock -u 9

for t in $targets; do
  [ -d "fuzz/corpus/$t" ] || { echo "fuzz: $t: no seed corpus fuzz/corpus/$t"; failed=$((failed + 1)); continue; }
  corpus="$work/corpus/$t"
  mkdir -p "$corpus" "$artifacts/$t"
  cp fuzz/corpus/"$t"/* "$corpus"/
  seeds=$(ls "$corpus" | wc -l)
  log="$work/$t.log"
  rc=0
  "$bin_dir/$t" "$corpus" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/$t/" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    echo "fuzz: $t: ok, ${execs:-?} executions in ${seconds} s, corpus $seeds -> $(ls "$corpus" | wc -l)"
  else
    failed=$((failed + 1))
    echo "fuzz: $t: FAILED (exit $rc) after ${execs:-?} executions"
    show_failure "$t" "$log" || true
  fi
done
[ -n "${FUZZ_ARTIFACTS:-}" ] || [ "$failed" -eq 0 ] || {
  kept=$(mktemp -d /tmp/meshcni-fuzz-artifacts.XXXXXX)
  cp -r "$artifacts"/. "$kept"/
  echo "fuzz: crashing inputs kept in $kept"
}
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
