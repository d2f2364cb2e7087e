//! The file store's behaviour, through its public API and its files.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::issue::Issue;
use crate::record::IssueStatus;
use crate::small_fs::SmallFs;

fn record(n: u64, status: IssueStatus) -> IssueRecord {
    let key = IssueKey::new("o/r".parse().unwrap(), n);
    let mut r = IssueRecord::new(Issue::new(key, format!("issue {n}")));
    r.status = status;
    r
}

#[tokio::test]
async fn acknowledged_puts_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        store.put(&record(1, IssueStatus::Queued)).await.unwrap();
        store.put(&record(1, IssueStatus::Done)).await.unwrap();
        store.put(&record(2, IssueStatus::Failed)).await.unwrap();
    }
    let store = FileStore::open(dir.path()).unwrap();
    let all = store.load().await.unwrap();
    let statuses: Vec<_> = all.iter().map(|r| (r.key().number, r.status)).collect();
    assert_eq!(statuses, [(1, IssueStatus::Done), (2, IssueStatus::Failed)]);
}

#[tokio::test]
async fn relaxed_puts_land_in_order_with_the_others() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        store.put(&record(1, IssueStatus::Running)).await.unwrap();
        store
            .put_relaxed(&record(1, IssueStatus::Done))
            .await
            .unwrap();
        store.put(&record(2, IssueStatus::Done)).await.unwrap();
    }
    // The durable put after it means the relaxed one is on disk too.
    let store = FileStore::open_read_only(dir.path()).unwrap();
    let statuses: Vec<_> = store
        .load()
        .await
        .unwrap()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [IssueStatus::Done, IssueStatus::Done]);
}

#[tokio::test]
async fn relaxed_puts_are_on_disk_once_the_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    for n in 0..50 {
        store
            .put_relaxed(&record(n, IssueStatus::Done))
            .await
            .unwrap();
    }
    drop(store);
    let reread = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reread.load().await.unwrap().len(), 50);
}

#[tokio::test]
async fn a_state_directory_without_a_journal_reads_as_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    assert!(reader.load().await.unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_puts_are_all_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let mut tasks = Vec::new();
    for n in 0..200 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store.put(&record(n, IssueStatus::Done)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    drop(store);
    let reread = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reread.load().await.unwrap().len(), 200);
}

#[test]
fn a_second_writer_is_refused_with_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    let _first = FileStore::open(dir.path()).unwrap();
    match FileStore::open(dir.path()) {
        Err(StoreError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let _store = FileStore::open(dir.path().join("state")).unwrap();
    for name in ["state", "state/state.jsonl", "state/lock"] {
        let mode = fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
    }
}

#[tokio::test]
async fn a_corrupt_line_before_good_ones_is_an_error_naming_file_and_line_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        store.put(&record(1, IssueStatus::Done)).await.unwrap();
        store.put(&record(2, IssueStatus::Done)).await.unwrap();
    }
    let journal = dir.path().join(JOURNAL);
    let mut lines: Vec<String> = fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    // Overwritten in place, as damage does: the other lines stay where
    // they were written.
    lines[1] = format!("{{not json{}}}", " ".repeat(lines[1].len() - 10));
    let text = lines.join("\n") + "\n";
    fs::write(&journal, &text).unwrap();
    for err in [
        FileStore::open(dir.path()).unwrap_err().to_string(),
        FileStore::open_read_only(dir.path())
            .unwrap_err()
            .to_string(),
    ] {
        assert!(err.contains("state.jsonl line 2"), "{err}");
    }
    assert_eq!(
        fs::read_to_string(&journal).unwrap(),
        text,
        "the file was changed"
    );
    assert!(torn_files(dir.path()).is_empty());
}

#[tokio::test]
async fn a_torn_last_line_is_moved_aside_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        store.put(&record(1, IssueStatus::Done)).await.unwrap();
    }
    let journal = dir.path().join(JOURNAL);
    let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
    f.write_all(b"{\"issue\":{\"key\"").unwrap();
    drop(f);
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load().await.unwrap().len(), 1);
    store.put(&record(2, IssueStatus::Done)).await.unwrap();
    drop(store);
    let kept: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(fs::read(kept[0].path()).unwrap(), b"{\"issue\":{\"key\"");
    let reread = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reread.load().await.unwrap().len(), 2);
}

#[tokio::test]
async fn compaction_keeps_the_latest_version_of_every_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        for round in 0..(COMPACT_SLACK / 10 + 20) {
            for n in 0..10 {
                let mut r = record(n, IssueStatus::Running);
                r.round = u32::try_from(round).unwrap();
                store.put(&r).await.unwrap();
            }
        }
    }
    let lines = fs::read_to_string(dir.path().join(JOURNAL))
        .unwrap()
        .lines()
        .count();
    assert!(
        lines < COMPACT_SLACK,
        "journal was not compacted: {lines} lines"
    );
    let store = FileStore::open_read_only(dir.path()).unwrap();
    let all = store.load().await.unwrap();
    assert_eq!(all.len(), 10);
    let last = u32::try_from(COMPACT_SLACK / 10 + 19).unwrap();
    assert!(all.iter().all(|r| r.round == last));
}

#[tokio::test]
async fn the_service_state_survives_reopening_and_readers_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load_service().await.unwrap(), ServiceState::default());
    let state = ServiceState {
        paused_until: Some(std::time::SystemTime::UNIX_EPOCH),
        pause_reason: Some("quota".into()),
        quota_exits: 2,
        ..ServiceState::default()
    };
    store.put_service(&state).await.unwrap();
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.load_service().await.unwrap(), state);
    assert!(matches!(
        reader.put_service(&state).await,
        Err(StoreError::ReadOnly)
    ));
    drop(store);
    let again = FileStore::open(dir.path()).unwrap();
    assert_eq!(again.load_service().await.unwrap(), state);
}

#[tokio::test]
async fn a_read_only_store_refuses_writes_and_sees_new_data_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let writer = FileStore::open(dir.path()).unwrap();
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    assert!(matches!(
        reader.put(&record(1, IssueStatus::Done)).await,
        Err(StoreError::ReadOnly)
    ));
    writer.put(&record(1, IssueStatus::Done)).await.unwrap();
    assert_eq!(reader.load().await.unwrap().len(), 1);
}

/// A record with every field in use and a body of `body_len` bytes.
fn full_record(n: u64, body_len: usize) -> IssueRecord {
    let mut r = record(n, IssueStatus::Queued);
    r.issue.body = format!("{n:>7} ").repeat(body_len / 8);
    r.issue.labels = vec!["claude-flow".into(), "bug".into()];
    r.issue.html_url = format!("https://github.com/o/r/issues/{n}");
    r.issue.author = Some("alice".into());
    r.issue.trigger = "label-event-1".into();
    r.reports.memo.insert("comment".into(), "42".into());
    r.updated_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    r
}

fn attempt(
    r: &IssueRecord,
    outcome: Option<crate::record::AttemptOutcome>,
) -> crate::record::Attempt {
    crate::record::Attempt {
        number: u32::try_from(r.attempts_this_round().count() + 1).unwrap(),
        round: r.round,
        run_id: format!("run-{}-{}", r.key().number, r.attempts.len()),
        started_at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
        finished_at: None,
        outcome,
        exit_code: None,
        signal: None,
        log_path: Some(PathBuf::from("/var/log/x.log")),
        pr_url: None,
        node: None,
    }
}

fn journal_len(dir: &Path) -> u64 {
    fs::metadata(dir.join(JOURNAL)).unwrap().len()
}

fn torn_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut kept: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    kept.sort();
    kept
}

#[tokio::test]
async fn the_body_is_stored_once_per_round_and_records_load_identical() {
    let dir = tempfile::tempdir().unwrap();
    let body_len = 256 * 1024;
    let mut expected = Vec::new();
    {
        let store = FileStore::open(dir.path()).unwrap();
        for n in 1..=2 {
            let mut r = full_record(n, body_len);
            store.put(&r).await.unwrap();
            for _ in 0..3 {
                r.status = IssueStatus::Running;
                r.attempts.push(attempt(&r, None));
                store.put(&r).await.unwrap();
                r.status = IssueStatus::Retrying;
                r.attempts.last_mut().unwrap().outcome =
                    Some(crate::record::AttemptOutcome::Failed {
                        reason: "exit code 1".into(),
                    });
                store.put(&r).await.unwrap();
            }
            r.status = IssueStatus::Failed;
            store.put(&r).await.unwrap();
            r.reports.shown = Some(crate::record::Shown::Failed);
            store.put_relaxed(&r).await.unwrap();
            expected.push(r);
        }
        // A new round with new text stores the new text once more.
        let r = &mut expected[1];
        r.round = 2;
        r.status = IssueStatus::Queued;
        r.issue.body = "a new body".into();
        r.issue.title = "a new title".into();
        store.put(r).await.unwrap();
        r.status = IssueStatus::Running;
        store.put(r).await.unwrap();
    }
    let size = journal_len(dir.path());
    let bodies = 2 * body_len as u64;
    assert!(
        size < bodies + 64 * 1024,
        "state.jsonl is {size} bytes for {bodies} bytes of bodies: the body is rewritten"
    );
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load().await.unwrap(), expected);
    drop(store);
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.load().await.unwrap(), expected);
}

/// Lines as versions before checksums wrote them: the whole record,
/// body included, on every line.
const PREVIOUS_FORMAT: &str = r#"{"claude_flow_state":1}
{"issue":{"key":{"repo":"o/r","number":7},"title":"old","body":"the old body","labels":["claude-flow"],"html_url":"https://github.com/o/r/issues/7","author":"alice","trigger":"t1","pr_scope":"same_repository"},"status":"queued","round":1,"attempts":[],"pr_url":null,"next_retry_at":null,"last_error":null,"reports":{"shown":null},"updated_at":"2026-11-30T09:00:00Z"}
{"issue":{"key":{"repo":"o/r","number":8},"title":"other","body":"","labels":[],"html_url":"","author":null,"trigger":"","pr_scope":"any_repository"},"status":"done","round":1,"attempts":[],"pr_url":"https://github.com/o/r/pull/9","next_retry_at":null,"last_error":null,"reports":{"outcome_reported":true},"updated_at":"2026-11-30T09:00:00Z"}
{"issue":{"key":{"repo":"o/r","number":7},"title":"old","body":"the old body","labels":["claude-flow"],"html_url":"https://github.com/o/r/issues/7","author":"alice","trigger":"t1","pr_scope":"same_repository"},"status":"failed","round":1,"attempts":[{"number":1,"round":1,"run_id":"r1","started_at":"2026-11-30T09:00:00Z","finished_at":"2026-11-30T09:01:00Z","outcome":{"kind":"failed","reason":"exit code 1"},"exit_code":1,"signal":null,"log_path":"/l/1.log","pr_url":null}],"pr_url":null,"next_retry_at":null,"last_error":"exit code 1","reports":{"shown":{"kind":"failed"}},"updated_at":"2026-11-30T09:02:00Z"}
"#;

#[tokio::test]
async fn a_journal_in_the_previous_format_loads_and_takes_new_writes() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(JOURNAL), PREVIOUS_FORMAT).unwrap();
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    let old = reader.load().await.unwrap();
    assert_eq!(old.len(), 2);
    assert_eq!(old[0].issue.body, "the old body");
    assert_eq!(old[0].status, IssueStatus::Failed);
    assert_eq!(old[0].attempts.len(), 1);
    assert_eq!(
        old[1].reports.shown(old[1].status),
        Some(crate::record::Shown::Succeeded)
    );

    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load().await.unwrap(), old);
    let mut changed = old[0].clone();
    changed.status = IssueStatus::Queued;
    changed.round = 2;
    store.put(&changed).await.unwrap();
    drop(store);
    let store = FileStore::open(dir.path()).unwrap();
    let now = store.load().await.unwrap();
    assert_eq!(now, [changed, old[1].clone()]);
}

#[tokio::test]
async fn the_journal_is_compacted_by_size_when_the_text_keeps_changing() {
    let dir = tempfile::tempdir().unwrap();
    let body_len = 128 * 1024;
    let mut r = full_record(1, body_len);
    {
        let store = FileStore::open(dir.path()).unwrap();
        for round in 1..=60u32 {
            r.round = round;
            r.issue.body = format!("round {round:>4}\n").repeat(body_len / 11);
            store.put(&r).await.unwrap();
        }
    }
    let size = journal_len(dir.path());
    assert!(
        size < 3 * 1024 * 1024,
        "state.jsonl is {size} bytes for one record of {body_len} bytes"
    );
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.load().await.unwrap(), [r]);
}

#[tokio::test]
async fn a_damaged_tail_is_set_aside_and_the_store_starts() {
    let zeros = vec![0u8; 5000];
    let cases: [(&str, &[u8]); 3] = [
        ("zero-filled after a power cut", &zeros),
        ("half-written", b"{\"crc\":\"0000"),
        ("a whole line that is not a record", b"{not json}\n"),
    ];
    for (what, tail) in cases {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path()).unwrap();
            store.put(&full_record(1, 1000)).await.unwrap();
        }
        let journal = dir.path().join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        f.write_all(tail).unwrap();
        drop(f);
        let store = FileStore::open(dir.path())
            .unwrap_or_else(|e| panic!("{what}: the store did not start: {e}"));
        assert_eq!(
            store.load().await.unwrap(),
            [full_record(1, 1000)],
            "{what}"
        );
        store.put(&full_record(2, 10)).await.unwrap();
        drop(store);
        let kept = torn_files(dir.path());
        assert_eq!(kept.len(), 1, "{what}: {kept:?}");
        assert_eq!(kept[0].1, tail, "{what}");
        let reader = FileStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.load().await.unwrap().len(), 2, "{what}");
    }
}

#[tokio::test]
async fn a_changed_byte_in_an_acknowledged_line_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        for n in 1..=3 {
            store.put(&record(n, IssueStatus::Done)).await.unwrap();
        }
    }
    let journal = dir.path().join(JOURNAL);
    let text = fs::read_to_string(&journal).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("\"issue 2\""))
        .unwrap()
        + 1;
    // Still valid JSON, still a valid record: only a checksum can tell.
    let damaged = text.replace("\"issue 2\"", "\"issue 8\"");
    fs::write(&journal, &damaged).unwrap();
    for err in [
        FileStore::open(dir.path()).unwrap_err().to_string(),
        FileStore::open_read_only(dir.path())
            .unwrap_err()
            .to_string(),
    ] {
        assert!(err.contains(&format!("state.jsonl line {line}")), "{err}");
        assert!(err.contains("checksum"), "{err}");
    }
    assert_eq!(fs::read_to_string(&journal).unwrap(), damaged);
}

#[tokio::test]
async fn torn_tails_in_the_same_second_each_get_their_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(JOURNAL);
    for i in 0..3 {
        {
            let store = FileStore::open(dir.path()).unwrap();
            store.put(&record(i, IssueStatus::Done)).await.unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        write!(f, "{{\"partial\":{i}").unwrap();
    }
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load().await.unwrap().len(), 3);
    let mut contents: Vec<_> = torn_files(dir.path()).into_iter().map(|(_, c)| c).collect();
    contents.sort();
    assert_eq!(
        contents,
        [&b"{\"partial\":0"[..], b"{\"partial\":1", b"{\"partial\":2"]
    );
}

/// Starts the store in `dir`, puts a new record `n` and stops it.
async fn start_and_put(dir: &Path, n: u64) -> IssueRecord {
    let store = FileStore::open(dir).unwrap();
    let r = record(n, IssueStatus::Queued);
    store.put(&r).await.unwrap();
    r
}

#[tokio::test]
async fn a_restart_after_the_disk_filled_up_needs_no_free_space() {
    let test = "a_restart_after_the_disk_filled_up_needs_no_free_space";
    let Some(fs_) = SmallFs::mount(test, 1024) else {
        return;
    };
    let state = fs_.path().join("state");
    let journal = state.join(JOURNAL);
    fs_.fill("small-filler", 8 * 1024);
    let mut acknowledged = Vec::new();
    {
        let store = FileStore::open(&state).unwrap();
        for n in 1..=4 {
            let r = full_record(n, 64 * 1024);
            store.put(&r).await.unwrap();
            acknowledged.push(r);
        }
        // Leave room for part of the next record only, as a disk that
        // fills up while the service writes does.
        let free = fs_.free();
        fs_.fill("big-filler", free - 40 * 1024);
        let err = store
            .put(&full_record(5, 64 * 1024))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("No space left"), "{err}");
    }
    let before = fs::read(&journal).unwrap();
    let good_len = before.iter().rposition(|b| *b == b'\n').unwrap() + 1;
    let tail = before[good_len..].to_vec();
    assert!(
        tail.len() > 30 * 1024,
        "the failed write left {} bytes, not the torn record this test is about",
        tail.len()
    );
    // Not a byte left: whatever the stop gave back is taken too (the
    // restart must not need the lock file's page back).
    fs_.fill("crumbs", fs_.free() + 4096);
    assert_eq!(fs_.free(), 0, "{} bytes free", fs_.free());

    // The restart on the full disk.
    let store = FileStore::open(&state).expect("a restart on a full disk");
    assert_eq!(store.load().await.unwrap(), acknowledged);
    drop(store);

    // Room for a small record but not for a copy of the torn one: the
    // service goes on, the torn bytes stay where they are.
    fs::remove_file(fs_.path().join("small-filler")).unwrap();
    fs::remove_file(fs_.path().join("crumbs")).unwrap();
    acknowledged.push(start_and_put(&state, 6).await);
    let now = fs::read(&journal).unwrap();
    assert_eq!(
        &now[..before.len()],
        &before[..],
        "the torn bytes were changed"
    );
    let store = FileStore::open(&state).unwrap();
    assert_eq!(store.load().await.unwrap(), acknowledged);
    drop(store);

    // With room again, the torn bytes move to a file of their own.
    fs::remove_file(fs_.path().join("big-filler")).unwrap();
    acknowledged.push(start_and_put(&state, 7).await);
    let kept = torn_files(&state);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].1, tail);
    let reader = FileStore::open_read_only(&state).unwrap();
    assert_eq!(reader.load().await.unwrap(), acknowledged);
    assert!(
        journal_len(&state) < before.len() as u64,
        "the torn bytes are still in the journal"
    );
}

/// A journal line written out by hand, which pins the format: the CRC-32
/// of everything between the `crc` field and the closing brace.
fn journal_line(batch: u64, record: &IssueRecord) -> String {
    let entry = serde_json::json!({ "full": record });
    let body = format!("\"batch\":{batch},\"e\":{entry}");
    format!(
        "{{\"crc\":\"{:08x}\",{body}}}\n",
        crc32fast::hash(body.as_bytes())
    )
}

/// A journal whose last write (one batch of three records) lost its middle
/// line to a power cut, and where the third line was written by a later
/// batch when `later` is set. Returns the journal and where the loss is.
fn journal_with_a_lost_line(later: bool) -> (String, usize, usize) {
    let mut text = format!("{HEADER}\n");
    let own = text.len() as u64;
    text.push_str(&journal_line(own, &full_record(1, 100)));
    let batch = text.len() as u64;
    text.push_str(&journal_line(batch, &full_record(2, 100)));
    let lost = text.len();
    let middle = journal_line(batch, &full_record(3, 100));
    text.push_str(&"\0".repeat(middle.len() - 1));
    text.push('\n');
    let third = if later { text.len() as u64 } else { batch };
    text.push_str(&journal_line(third, &full_record(4, 100)));
    (text, lost, 4)
}

#[tokio::test]
async fn a_line_lost_inside_the_last_batch_sets_the_rest_of_that_batch_aside() {
    let dir = tempfile::tempdir().unwrap();
    let (text, lost, _) = journal_with_a_lost_line(false);
    fs::write(dir.path().join(JOURNAL), &text).unwrap();
    // The batch was never synced, so none of it was acknowledged.
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.load().await.unwrap().len(), 2);
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(
        store.load().await.unwrap(),
        [full_record(1, 100), full_record(2, 100)]
    );
    drop(store);
    let kept = torn_files(dir.path());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].1, text.as_bytes()[lost..]);
}

#[tokio::test]
async fn a_line_lost_before_a_later_batch_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (text, _, line) = journal_with_a_lost_line(true);
    fs::write(dir.path().join(JOURNAL), &text).unwrap();
    for err in [
        FileStore::open(dir.path()).unwrap_err().to_string(),
        FileStore::open_read_only(dir.path())
            .unwrap_err()
            .to_string(),
    ] {
        assert!(err.contains(&format!("state.jsonl line {line}")), "{err}");
    }
    assert_eq!(fs::read_to_string(dir.path().join(JOURNAL)).unwrap(), text);
}

#[tokio::test]
async fn a_truncated_empty_journal_is_an_error_not_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        store.put(&record(1, IssueStatus::Failed)).await.unwrap();
    }
    let journal = dir.path().join(JOURNAL);
    fs::File::create(&journal).unwrap(); // truncated to 0 bytes
    for err in [
        FileStore::open(dir.path()).unwrap_err().to_string(),
        FileStore::open_read_only(dir.path())
            .and_then(|s| futures::executor::block_on(s.load()))
            .unwrap_err()
            .to_string(),
    ] {
        assert!(
            err.contains("state.jsonl") && err.contains("truncated"),
            "{err}"
        );
    }
    assert_eq!(fs::metadata(&journal).unwrap().len(), 0, "nothing written");
    // A state directory with no journal at all is a fresh start.
    fs::remove_file(&journal).unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    assert!(store.load().await.unwrap().is_empty());
}
