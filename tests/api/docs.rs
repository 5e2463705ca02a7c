//! The README and docs/ as a reader follows them: every relative link reaches a file
//! and every `#anchor` a heading of it, and docs/api.md documents exactly the routes
//! the hub answers (and, where the contract's source sits beside the repository, says
//! what it says).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_`
/// dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    markdown
        .lines()
        .filter(|line| {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            !in_code
        })
        .filter_map(|line| line.strip_prefix('#'))
        .map(|rest| slug(rest.trim_start_matches('#')))
        .collect()
}

/// The targets of `[text](target)` links outside code blocks and code spans.
fn links(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut found = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // code spans hold examples, not links
        let text: String = line
            .split('`')
            .enumerate()
            .filter(|(index, _)| index % 2 == 0)
            .map(|(_, part)| part)
            .collect();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            found.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    found
}

fn documents() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn every_link_in_the_readme_and_docs_reaches_a_file_and_a_heading() {
    let mut checked = 0;
    for document in documents() {
        let text = std::fs::read_to_string(&document).expect("readable");
        let dir = document.parent().expect("a directory");
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file: &Path = if file.is_empty() {
                &document
            } else {
                &dir.join(file)
            };
            assert!(
                file.exists(),
                "{}: the link to {target} names no file",
                document.display()
            );
            if !anchor.is_empty() {
                let heading_text = std::fs::read_to_string(file).expect("a markdown file");
                assert!(
                    anchors(&heading_text).contains(anchor),
                    "{}: no heading in {} for #{anchor}",
                    document.display(),
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 15,
        "only {checked} links found: is the parser right?"
    );
}

/// `METHOD /path` pairs a contract names (`GET|DELETE /x` counts for both), with path
/// parameters as `{}`.
fn endpoints(contract: &str) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for span in contract.split('`').skip(1).step_by(2) {
        let Some((methods, path)) = span.split_once(' ') else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        let path = path.split(['?', ' ']).next().unwrap_or(path);
        let path = normalize(path);
        for method in methods.split('|') {
            if ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method) {
                found.insert((method.to_owned(), path.clone()));
            }
        }
    }
    found
}

fn normalize(path: &str) -> String {
    path.split('/')
        .map(|part| if part.starts_with('{') { "{}" } else { part })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn docs_api_md_names_exactly_the_routes_the_hub_answers() {
    let documented =
        endpoints(&std::fs::read_to_string(root().join("docs/api.md")).expect("docs/api.md"));
    let mut answered: BTreeSet<(String, String)> = hivesync::http::ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), normalize(path)))
        .collect();
    // the WebSocket is served beside the REST routes, not among them
    answered.insert(("GET".into(), "/api/v1/ws".into()));
    let missing: Vec<_> = documented.difference(&answered).collect();
    assert!(missing.is_empty(), "documented, not answered: {missing:?}");
    let undocumented: Vec<_> = answered.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "answered, not documented: {undocumented:?}"
    );

    // the contract's source, where this checkout sits beside it
    let source = root().join("../shared/API.md");
    match std::fs::read_to_string(&source) {
        Ok(shared) => assert_eq!(
            endpoints(&shared),
            documented,
            "docs/api.md is not in step with {}",
            source.display()
        ),
        // a clone elsewhere (CI's) has only its own copy, checked above against the hub
        Err(_) => eprintln!(
            "{} is not beside this checkout: docs/api.md checked against the hub's routes",
            source.display()
        ),
    }
}

#[test]
fn anchors_and_links_are_read_as_github_does() {
    assert_eq!(slug(" Past one Redis"), "past-one-redis");
    assert_eq!(
        slug("From a terminal: `hivesync sync`"),
        "from-a-terminal-hivesync-sync"
    );
    assert_eq!(
        links("see [a](b.md#c), `[not](x)` and ![pic](d.png)"),
        ["b.md#c", "d.png"]
    );
    assert!(
        endpoints("`GET|DELETE /api/v1/projects/{id}` and `POST /x?y=1`")
            .contains(&("DELETE".to_owned(), "/api/v1/projects/{}".to_owned()))
    );
}

/// docs/configuration.md's table and `config.rs` name the same variables: one added to
/// either alone fails here (as `serve --help` is checked against `config.rs`).
#[test]
fn the_configuration_table_lists_every_variable_the_hub_reads() {
    // the hub's settings, and the client commands' (HIVESYNC_SERVER, HIVESYNC_TOKEN)
    let source = [
        include_str!("../../src/config/mod.rs"),
        include_str!("../../src/main.rs"),
    ]
    .concat();
    let read: BTreeSet<&str> = source
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    let table = std::fs::read_to_string(root().join("docs/configuration.md")).expect("readable");
    let listed: BTreeSet<&str> = table
        .lines()
        .filter(|line| line.starts_with("| `"))
        .flat_map(|line| {
            let first = line.split('|').nth(1).unwrap_or_default();
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| name.starts_with("HIVESYNC_") || *name == "RUST_LOG")
                .collect::<Vec<_>>()
        })
        .collect();
    // read by the log set-up, not through clap
    let elsewhere = ["RUST_LOG", "HIVESYNC_LOG_FORMAT"];
    let unlisted: Vec<_> = read.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "read by the hub, not in docs/configuration.md: {unlisted:?}"
    );
    let unknown: Vec<_> = listed
        .iter()
        .filter(|name| !read.contains(*name) && !elsewhere.contains(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "in docs/configuration.md, read by nothing: {unknown:?}"
    );
}
