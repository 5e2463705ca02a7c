//! Search of a mirror at one commit, within a budget a client cannot stretch: the
//! pattern's length and compiled size are capped, and the scan stops — between files
//! and between pieces of a large file — when the deadline passes or the caller cancels
//! (the client left, the server is shutting down). Blocking: run on the blocking pool.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use grep_matcher::Matcher;
use grep_regex::{RegexMatcher, RegexMatcherBuilder};
use grep_searcher::{Searcher, SearcherBuilder, sinks};
use serde::Serialize;

use super::read::{ReadError, Reader, git_error, under_prefix};
use crate::domain::{ProjectId, RepoPath};

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN: usize = 1024;
/// Largest compiled regex, and the lazy DFA's cache: a pattern over these is refused,
/// so no pattern can make matching cost more than a few passes over the data.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
const DFA_SIZE_LIMIT: usize = 2 * 1024 * 1024;
/// A file is searched in pieces of about this size, with the budget checked between.
const PIECE: usize = 256 * 1024;
/// A matched line is shown up to this many bytes.
const LINE_CAP: usize = 500;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema, PartialEq, Eq)]
pub struct SearchMatch {
    pub path: String,
    pub line: u64,
    pub column: u64,
    pub text: String,
}

pub struct SearchQuery<'a> {
    pub pattern: &'a str,
    pub regex: bool,
    pub path_prefix: &'a RepoPath,
    pub limit: usize,
    /// past this, the search stops and reports `timed_out`
    pub deadline: Instant,
    /// set when nobody waits for the answer any more
    pub cancel: &'a AtomicBool,
}

impl SearchQuery<'_> {
    fn out_of_budget(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
}

/// What a search found, and whether it stopped early.
#[derive(Debug, Default)]
pub struct SearchOutcome {
    pub matches: Vec<SearchMatch>,
    /// stopped before the end: the limit was reached or the budget ran out
    pub truncated: bool,
    /// the budget ran out (or the caller cancelled) before the scan ended
    pub timed_out: bool,
}

/// Compiles the pattern within the size limits; too long or too expensive to compile
/// is `Invalid`.
pub fn matcher(pattern: &str, regex: bool) -> Result<RegexMatcher, ReadError> {
    if pattern.len() > MAX_PATTERN {
        return Err(ReadError::Invalid(format!(
            "q is too long (at most {MAX_PATTERN} bytes)"
        )));
    }
    RegexMatcherBuilder::new()
        .fixed_strings(!regex)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(DFA_SIZE_LIMIT)
        .build(pattern)
        .map_err(|err| {
            let text = err.to_string();
            if text.contains("size limit") {
                ReadError::Invalid(
                    "the pattern is too large or too expensive to compile".to_owned(),
                )
            } else {
                ReadError::Invalid(format!("invalid regex: {text}"))
            }
        })
}

impl Reader {
    pub fn search(
        &self,
        project: &ProjectId,
        commit: &str,
        query: &SearchQuery<'_>,
    ) -> Result<SearchOutcome, ReadError> {
        let matcher = matcher(query.pattern, query.regex)?;
        self.with_repo(project, |repo| {
            let root = Self::tree_at(repo, commit)?;
            let mut recorder = gix::traverse::tree::Recorder::default();
            root.traverse()
                .breadthfirst(&mut recorder)
                .map_err(git_error)?;
            let mut files: Vec<_> = recorder
                .records
                .into_iter()
                .filter(|entry| entry.mode.is_blob())
                .map(|entry| (entry.filepath.to_string(), entry.oid))
                .filter(|(path, _)| under_prefix(path, query.path_prefix))
                .collect();
            files.sort();

            // files are split across threads like `git grep` does; each keeps at most
            // `limit` matches, and the merge keeps the first `limit` in path order
            let threads = std::thread::available_parallelism()
                .map_or(1, usize::from)
                .clamp(1, 8);
            let chunk = files.len().div_ceil(threads).max(1);
            let shared = repo.repo.clone().into_sync();
            let results: Vec<Result<SearchOutcome, ReadError>> = std::thread::scope(|scope| {
                let workers: Vec<_> = files
                    .chunks(chunk)
                    .map(|part| {
                        let (shared, matcher) = (&shared, &matcher);
                        scope.spawn(move || {
                            search_files(&shared.to_thread_local(), matcher, part, query)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|worker| {
                        worker.join().unwrap_or_else(|_| {
                            Err(ReadError::Git("search thread panicked".into()))
                        })
                    })
                    .collect()
            });
            let mut outcome = SearchOutcome::default();
            for result in results {
                let part = result?;
                outcome.matches.extend(part.matches);
                outcome.truncated |= part.truncated;
                outcome.timed_out |= part.timed_out;
            }
            // chunks are in path order, so this keeps the first matches a sequential scan finds
            if outcome.matches.len() > query.limit {
                outcome.matches.truncate(query.limit);
                outcome.truncated = true;
            }
            Ok(outcome)
        })
    }
}

/// Searches `files` in order; stops at `query.limit` matches or when the budget ends.
fn search_files(
    repo: &gix::Repository,
    matcher: &RegexMatcher,
    files: &[(String, gix::ObjectId)],
    query: &SearchQuery<'_>,
) -> Result<SearchOutcome, ReadError> {
    let mut searcher = SearcherBuilder::new().line_number(true).build();
    let mut outcome = SearchOutcome::default();
    for (path, oid) in files {
        if query.out_of_budget() {
            outcome.truncated = true;
            outcome.timed_out = true;
            return Ok(outcome);
        }
        let blob = repo.find_blob(*oid).map_err(git_error)?;
        // binary files (a NUL anywhere) are not searched, as git grep does
        if blob.data.contains(&0) {
            continue;
        }
        let complete = search_blob(
            &mut searcher,
            matcher,
            path,
            &blob.data,
            query,
            &mut outcome.matches,
        );
        if !complete {
            outcome.truncated = true;
            outcome.timed_out = query.out_of_budget();
            return Ok(outcome);
        }
    }
    Ok(outcome)
}

/// Searches one file piece by piece (each piece ends at a line end where there is one
/// within reach), checking the budget between pieces. Returns whether it got to the
/// end of the file without hitting the limit or the budget.
fn search_blob(
    searcher: &mut Searcher,
    matcher: &RegexMatcher,
    path: &str,
    data: &[u8],
    query: &SearchQuery<'_>,
    matches: &mut Vec<SearchMatch>,
) -> bool {
    let mut start = 0;
    let mut lines_before: u64 = 0;
    while start < data.len() {
        if start > 0 && query.out_of_budget() {
            return false;
        }
        let mut end = (start + PIECE).min(data.len());
        if end < data.len()
            && let Some(newline) = data[start..end].iter().rposition(|b| *b == b'\n')
        {
            end = start + newline + 1;
        }
        let piece = &data[start..end];
        let mut remaining = query.limit.saturating_sub(matches.len());
        if remaining == 0 {
            return false;
        }
        let outcome = searcher.search_slice(
            matcher,
            piece,
            sinks::Lossy(|line_number, line| {
                let line = line.trim_end_matches(['\n', '\r']);
                let column = matcher
                    .find(line.as_bytes())
                    .ok()
                    .flatten()
                    .map_or(1, |m| m.start() as u64 + 1);
                matches.push(SearchMatch {
                    path: path.to_owned(),
                    line: lines_before + line_number,
                    column,
                    text: cap_line(line),
                });
                remaining -= 1;
                Ok(remaining > 0)
            }),
        );
        if let Err(err) = outcome {
            tracing::debug!(%path, error = %err, "skipping a file the searcher could not read");
            return true;
        }
        if matches.len() >= query.limit {
            return false;
        }
        lines_before += piece.iter().filter(|b| **b == b'\n').count() as u64;
        start = end;
    }
    true
}

fn cap_line(line: &str) -> String {
    if line.len() <= LINE_CAP {
        return line.to_owned();
    }
    let mut end = LINE_CAP;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_too_long_or_too_expensive_are_refused() {
        assert!(matches!(
            matcher(&"a".repeat(MAX_PATTERN + 1), false),
            Err(ReadError::Invalid(_))
        ));
        let Err(ReadError::Invalid(message)) = matcher("a{1000}{1000}", true) else {
            panic!("a pattern of a million states compiles");
        };
        assert!(message.contains("too large"), "{message}");
        assert!(matcher("fn [a-z_]+\\(", true).is_ok());
        assert!(
            matcher("a{1000}{1000}", false).is_ok(),
            "literal text is cheap"
        );
    }

    #[test]
    fn a_large_file_is_searched_in_pieces_with_line_numbers_intact_and_stops_when_cancelled() {
        let mut data = Vec::new();
        for line in 1..=40_000u32 {
            data.extend_from_slice(format!("line {line} of filler text\n").as_bytes());
        }
        assert!(data.len() > 3 * PIECE);
        let cancel = AtomicBool::new(false);
        let prefix = RepoPath::default();
        let query = SearchQuery {
            pattern: "line 39999 ",
            regex: false,
            path_prefix: &prefix,
            limit: 10,
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            cancel: &cancel,
        };
        let matcher = matcher(query.pattern, false).expect("matcher");
        let mut searcher = SearcherBuilder::new().line_number(true).build();
        let mut found = Vec::new();
        assert!(search_blob(
            &mut searcher,
            &matcher,
            "f",
            &data,
            &query,
            &mut found
        ));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, 39_999, "line numbers run on across pieces");

        cancel.store(true, Ordering::Relaxed);
        let mut found = Vec::new();
        assert!(
            !search_blob(&mut searcher, &matcher, "f", &data, &query, &mut found),
            "a cancelled search stops after the piece it is in"
        );
        assert!(found.is_empty());
    }
}
