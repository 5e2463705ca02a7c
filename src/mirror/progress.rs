//! gix's progress counters, sampled into one bar that only moves forward: objects and
//! bytes received, and the percent of the whole sync (each phase owns a share).

use gix::progress::tree::Root;

use super::Phase;

/// Progress ids gix's pack writer reports under (see `gix_pack` `ProgressId`).
pub(crate) const PACK_BYTES: [u8; 4] = *b"BWRB";
pub(crate) const INDEXED_OBJECTS: [u8; 4] = *b"IWIO";
/// Our own ids for the checkout.
pub(crate) const CHECKOUT_FILES: [u8; 4] = *b"HSCF";
pub(crate) const CHECKOUT_BYTES: [u8; 4] = *b"HSCB";

/// What a sample of the counters says, in the contract's units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub percent: u8,
    pub objects: u64,
    pub bytes: u64,
}

/// Reads the counters gix keeps in `root` into the contract's progress shape, with the
/// percent of the phase the sync is in.
pub fn sample_progress(root: &Root, phase: Phase) -> Counters {
    let mut tasks = Vec::new();
    root.sorted_snapshot(&mut tasks);
    let mut progress = Counters::default();
    let mut fraction: Option<f64> = None;
    for (_, task) in &tasks {
        let Some(value) = &task.progress else {
            continue;
        };
        let step = value.step.load(std::sync::atomic::Ordering::Relaxed) as u64;
        match task.id {
            PACK_BYTES => progress.bytes = progress.bytes.max(step),
            INDEXED_OBJECTS => {
                progress.objects = progress.objects.max(step);
                if phase == Phase::Fetching {
                    fraction = value
                        .done_at
                        .filter(|total| *total > 0)
                        .map(|total| step as f64 / total as f64);
                }
            }
            CHECKOUT_FILES if phase == Phase::UpdatingFiles => {
                fraction = value
                    .done_at
                    .filter(|total| *total > 0)
                    .map(|total| step as f64 / total as f64);
            }
            _ => {}
        }
    }
    // the share of the whole sync each phase stands for, so one bar moves forward only
    let (start, span) = match phase {
        Phase::Fetching => (0.0, 70.0),
        Phase::UpdatingFiles => (70.0, 25.0),
        Phase::Cleaning => (95.0, 2.0),
        Phase::Finalizing => (97.0, 2.0),
    };
    let percent = start + span * fraction.unwrap_or(0.0).clamp(0.0, 1.0);
    progress.percent = percent.floor() as u8;
    progress
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_fills_its_own_share_of_one_bar() {
        let root = Root::new();
        let objects = root.add_child_with_id("indexing", INDEXED_OBJECTS);
        objects.init(Some(200), None);
        objects.set(50);
        let bytes = root.add_child_with_id("receiving", PACK_BYTES);
        // gix counts pack bytes with a unit and no known total
        bytes.init(None, gix::progress::bytes());
        bytes.set(4096);
        let fetching = sample_progress(&root, Phase::Fetching);
        assert_eq!(
            fetching,
            Counters {
                percent: 17,
                objects: 50,
                bytes: 4096
            },
            "a quarter of the fetch's 70 %"
        );

        let files = root.add_child_with_id("checkout", CHECKOUT_FILES);
        files.init(Some(10), None);
        files.set(10);
        let updating = sample_progress(&root, Phase::UpdatingFiles);
        assert_eq!(
            updating.percent, 95,
            "all files: the end of the checkout's share"
        );
        assert_eq!(sample_progress(&root, Phase::Cleaning).percent, 95);
        assert_eq!(sample_progress(&root, Phase::Finalizing).percent, 97);
    }

    #[test]
    fn no_counters_yet_is_the_start_of_the_phase() {
        let root = Root::new();
        assert_eq!(sample_progress(&root, Phase::Fetching), Counters::default());
        assert_eq!(sample_progress(&root, Phase::UpdatingFiles).percent, 70);
    }
}
