//! Named fault-injection points at the boundaries of a sync's writes, so a test can put
//! a kill or an error exactly in a window a few microseconds wide, which random kills
//! almost never hit.
//!
//! Compiled in only with the `failpoints` feature (the test suite turns it on); without
//! it [`hit`] is an empty function. With it, `HIVESYNC_FAILPOINTS` arms points when
//! the process starts: `NAME=ACTION[,NAME=ACTION…]`, where ACTION is
//!
//! - `abort`: the process dies on the spot, as under `kill -9` (no destructor, no
//!   flush, no reply);
//! - `error`: the step fails once, as an outage of the engine or the disk would make
//!   it, and runs normally after that.
//!
//! The points ([`POINTS`]): `sync.after_fetch` (the mirror fetched, nothing swapped
//! yet), `sync.after_swap` (the new tree swapped in, the sync's final record not
//! written), `job.after_final_record` (the final record stored, its stage event and
//! notification not yet published), `job.after_notification` (the notification
//! published, the job not yet acknowledged).

/// Every point the code has.
pub const POINTS: [&str; 4] = [
    "sync.after_fetch",
    "sync.after_swap",
    "job.after_final_record",
    "job.after_notification",
];

/// What an armed point did instead of letting the step run.
#[derive(Debug, thiserror::Error)]
#[error("fault injected at {0}")]
pub struct Injected(pub &'static str);

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::OnceLock;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Action {
        Abort,
        /// fails this many more times
        Error(u32),
    }

    pub(super) fn table() -> &'static Mutex<HashMap<String, Action>> {
        static TABLE: OnceLock<Mutex<HashMap<String, Action>>> = OnceLock::new();
        TABLE.get_or_init(|| {
            let spec = std::env::var("HIVESYNC_FAILPOINTS").unwrap_or_default();
            Mutex::new(parse(&spec))
        })
    }

    pub(super) fn parse(spec: &str) -> HashMap<String, Action> {
        spec.split(',')
            .filter_map(|item| item.split_once('='))
            .filter_map(|(name, action)| {
                let action = match action.trim() {
                    "abort" => Action::Abort,
                    "error" => Action::Error(1),
                    _ => return None,
                };
                Some((name.trim().to_owned(), action))
            })
            .collect()
    }
}

/// Passes the point `name`: `Err` when it is armed to fail the step here; never
/// returns when it is armed to abort the process.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) -> Result<(), Injected> {
    use armed::Action;
    let mut table = armed::table().lock().unwrap_or_else(|e| e.into_inner());
    match table.get_mut(name) {
        None => Ok(()),
        Some(Action::Abort) => {
            eprintln!("failpoint {name}: aborting the process");
            std::process::abort();
        }
        Some(Action::Error(left)) => {
            if *left == 0 {
                return Ok(());
            }
            *left -= 1;
            tracing::warn!(failpoint = name, "failpoint: failing the step");
            Err(Injected(name))
        }
    }
}

/// Passes the point `name` (fault injection is compiled out of this build).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) -> Result<(), Injected> {
    Ok(())
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::armed::{Action, parse};

    #[test]
    fn specs_parse_and_unknown_actions_are_ignored() {
        let table = parse("job.after_final_record=abort, sync.after_fetch=error,x=explode");
        assert_eq!(table.get("job.after_final_record"), Some(&Action::Abort));
        assert_eq!(table.get("sync.after_fetch"), Some(&Action::Error(1)));
        assert_eq!(table.get("x"), None);
    }
}
