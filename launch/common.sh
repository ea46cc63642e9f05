# shellcheck shell=bash
# Helpers shared by the launchers in launch/ (sourced by them, not run by itself).
#
# Dry runs: `--dry-run` (or LIMA_DRY_RUN=1 in the environment) makes `run_cmd` print each command instead
# of running it: one command a line, every word shell-quoted, so that the output can be pasted into a shell
# or split with Python's shlex.split. Messages for people go to stderr; stdout carries only the commands.

DRY_RUN=${LIMA_DRY_RUN:-0}
PROG=${PROG:-$(basename "$0")}

# quote WORD...: the words on one line, each shell-quoted ('...' unless it is made of safe characters only).
quote() {
  local words=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$w")
    else
      words+=("'${w//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${words[*]}"
}

# run_cmd CMD...: runs the command, or prints it in a dry run.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

# run_bg LOG CMD...: starts the command in the background with stdout and stderr appended to LOG (its pid
# is then in $!), or prints it, redirection included, in a dry run.
run_bg() {
  local log=$1
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s >> %s 2>&1 &\n' "$(quote "$@")" "$(quote "$log")"
  else
    "$@" >>"$log" 2>&1 &
  fi
}

say() {
  echo "$PROG: $*" >&2
}

die() {
  say "error: $*"
  exit 1
}

# bad_usage MESSAGE: the message and the usage text on stderr, exit status 2. Each launcher defines usage().
bad_usage() {
  say "error: $*"
  usage >&2
  exit 2
}

# need_value OPTION ARGC: fails with a usage error when OPTION has no value after it.
need_value() {
  [[ "$2" -ge 2 ]] || bad_usage "$1 needs a value"
}

# is_uint WORD: whether WORD is a non-negative integer.
is_uint() {
  [[ "$1" =~ ^[0-9]+$ ]]
}
