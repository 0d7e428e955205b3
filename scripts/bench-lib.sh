# Shared by the bench scripts (sourced): ending what a script started, only by its PIDs.

# end_pids PID...: each process that still runs gets TERM, then KILL if it lingers past 5 s.
end_pids() {
    local pid
    for pid in "$@"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}
