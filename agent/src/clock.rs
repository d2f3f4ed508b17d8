//! The guest's realtime clock, set from the host's.

use banger_agent_proto::{AgentError, ErrorKind};

/// Set the realtime clock to `unix_ns` (nanoseconds since the epoch);
/// returns how far it was off (host minus guest).
pub fn set(unix_ns: i64) -> Result<i64, AgentError> {
    use nix::time::{ClockId, clock_gettime, clock_settime};
    if unix_ns <= 0 {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!("{unix_ns} is not a time after the epoch"),
        ));
    }
    let failed = |what: &str, e: nix::errno::Errno| {
        AgentError::new(ErrorKind::Failed, format!("{what}: {e}"))
    };
    let now = clock_gettime(ClockId::CLOCK_REALTIME).map_err(|e| failed("read the clock", e))?;
    let guest_ns = now.tv_sec() as i128 * 1_000_000_000 + now.tv_nsec() as i128;
    let offset_ns = i64::try_from(unix_ns as i128 - guest_ns).unwrap_or(i64::MAX);
    let ts = nix::sys::time::TimeSpec::new(unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| failed("set the clock", e))?;
    Ok(offset_ns)
}
