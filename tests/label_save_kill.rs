//! Issue 11: the GUI's label saving under `kill -9`. A child process (this test binary run again, see
//! [`CHILD_ENV`]) opens a copy of the demo folder through the app's own opening code, labels images one by one
//! through [`Session::label_images`] (what a digit key does) and prints `ack` after each save returns; the parent
//! kills it with SIGKILL at a pseudo-random point, reopens the project and checks that every acknowledged label
//! is on disk. Rounds continue from the previous round's state, so a later round also checks that a file left by
//! a kill (and its leftover `.tmp`) opens and saves again.
//!
//! The kill points come from a fixed seed (a number of acks, then a short spin), but where the child is when the
//! signal lands depends on the scheduler: no assertion depends on timing, only on what was acknowledged.

mod common;
use common::copy_dir;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hegraph::app::{AppOptions, HeGraphApp};
use hegraph::project::{default_project_path, temp_path, Project};
use hegraph::rng::Rng;

/// Set (to a plan file) in the child's environment: the child test labels what the plan says.
const CHILD_ENV: &str = "HEGRAPH_KILL9_CHILD_PLAN";
const ROUNDS: u64 = 20;
/// Labelling actions planned per round (a round usually dies before the end).
const ACTIONS: usize = 30;
const SEED: u64 = 0x6b69_6c6c;

/// Labels per image: relative path → class name.
type Labels = BTreeMap<String, String>;

/// One planned action: image, class (`None` removes the label).
type Action = (String, Option<String>);

fn app_options(dir: &Path) -> AppOptions {
    AppOptions {
        cache_dir: Some(dir.join("cache")),
        model_dir: None,
        auto_embed: false,
        thumb_threads: 1,
        thumb_capacity: 16,
        backend: hegraph::gpu::BackendRequest::Cpu,
        user_dir: Some(dir.join("user")),
    }
}

fn write_plan(path: &Path, folder: &Path, work: &Path, actions: &[Action]) {
    let mut text = format!("{}\n{}\n", folder.display(), work.display());
    for (rel, class) in actions {
        text.push_str(&format!("{rel}\t{}\n", class.as_deref().unwrap_or("")));
    }
    std::fs::write(path, text).unwrap();
}

fn apply(labels: &mut Labels, (rel, class): &Action) {
    match class {
        Some(c) => {
            labels.insert(rel.clone(), c.clone());
        }
        None => {
            labels.remove(rel);
        }
    }
}

/// The child: opens the folder as the GUI does and labels per the plan, acknowledging each saved action.
#[test]
fn kill9_child_labeller() {
    let Ok(plan) = std::env::var(CHILD_ENV) else {
        return; // A normal test run: only the parent below starts this as a child.
    };
    let text = std::fs::read_to_string(plan).unwrap();
    let mut lines = text.lines();
    let folder = PathBuf::from(lines.next().unwrap());
    let work = PathBuf::from(lines.next().unwrap());
    let mut app = HeGraphApp::new(app_options(&work));
    app.open_path(&folder).unwrap();
    let s = app.session_mut().unwrap();
    let stdout = std::io::stdout();
    for line in lines {
        let (rel, class) = line.split_once('\t').unwrap();
        let i = s.images.iter().position(|im| im.rel == rel).unwrap();
        let c = (!class.is_empty()).then(|| s.classes().iter().position(|x| x == class).unwrap());
        let out = s.label_images(&[i], c, false);
        out.saved.unwrap();
        let mut o = stdout.lock();
        writeln!(o, "ack\t{rel}\t{class}").unwrap();
        o.flush().unwrap();
    }
}

#[test]
fn every_acknowledged_label_survives_kill_9_during_saves() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("demo");
    copy_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo"),
        &folder,
    );
    // Opening the folder once creates the project (classes.txt, labels.csv), as the GUI does.
    let mut app = HeGraphApp::new(app_options(dir.path()));
    app.open_path(&folder).unwrap();
    let session = app.session().unwrap();
    let classes = session.classes().to_vec();
    let images: Vec<String> = session.images.iter().map(|im| im.rel.clone()).collect();
    let project_path = default_project_path(&session.project.folder);
    drop(app);
    let mut state: Labels = Project::load(&project_path).unwrap().project.labels;
    assert!(
        !state.is_empty(),
        "the demo starts with labels.csv's labels"
    );

    let exe = std::env::current_exe().unwrap();
    let plan_path = dir.path().join("plan.txt");
    let mut rng = Rng::new(SEED);
    let (mut killed, mut acked_total, mut mid_save) = (0, 0, 0);
    for round in 0..ROUNDS {
        // Mostly new labels and relabels, sometimes a removal: every action changes the label.
        let mut planned = state.clone();
        let mut actions: Vec<Action> = Vec::new();
        while actions.len() < ACTIONS {
            let rel = images[rng.below(images.len())].clone();
            let class = if rng.bool(0.15) {
                None
            } else {
                Some(classes[rng.below(classes.len())].clone())
            };
            if planned.get(&rel) != class.as_ref() {
                let a = (rel, class);
                apply(&mut planned, &a);
                actions.push(a);
            }
        }
        write_plan(&plan_path, &folder, dir.path(), &actions);
        let kill_after = rng.below(ACTIONS - 2);
        let spin = rng.below(200_000);

        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill9_child_labeller",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &plan_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut acks: Vec<(String, String)> = Vec::new();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut sent = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // libtest may print "test kill9_child_labeller ... " on the first ack's line.
            if let Some((_, rest)) = line.trim_end_matches('\n').split_once("ack\t") {
                let (rel, class) = rest.split_once('\t').unwrap();
                acks.push((rel.to_string(), class.to_string()));
                if !sent && acks.len() > kill_after {
                    // A short busy wait so the signal lands at varying points of the next save.
                    let mut x = 0u64;
                    for i in 0..spin as u64 {
                        x = std::hint::black_box(x.wrapping_add(i));
                    }
                    child.kill().unwrap();
                    sent = true;
                }
            }
        }
        let status = child.wait().unwrap();
        // Lines read after the kill were printed before it: they are acknowledged too.
        let n = acks.len();
        for (k, (rel, class)) in acks.iter().enumerate() {
            assert_eq!(
                (rel, class.as_str()),
                (&actions[k].0, actions[k].1.as_deref().unwrap_or("")),
                "round {round}: the child acknowledged actions out of order"
            );
        }
        if status.success() {
            assert_eq!(n, ACTIONS, "round {round}: the child exited early");
        } else {
            killed += 1;
        }
        acked_total += n;

        // Reopen: the file parses, and holds every acknowledged label: exactly the state after the
        // acknowledged actions, or after one more (the save in flight when the kill landed had renamed its file).
        let loaded = Project::load(&project_path).unwrap_or_else(|e| {
            panic!("round {round}: the project does not open after kill -9: {e}")
        });
        let mut after_acks = state.clone();
        for a in &actions[..n] {
            apply(&mut after_acks, a);
        }
        let on_disk = loaded.project.labels;
        if on_disk == after_acks {
            state = after_acks;
        } else {
            let mut one_more = after_acks.clone();
            assert!(
                n < ACTIONS,
                "round {round}: all {n} actions acknowledged but the file differs"
            );
            apply(&mut one_more, &actions[n]);
            let lost: Vec<_> = actions[..n]
                .iter()
                .filter(|(rel, c)| on_disk.get(rel) != c.as_ref())
                .collect();
            assert_eq!(
                on_disk, one_more,
                "round {round}: after {n} acknowledged actions the file holds neither their state nor the next \
                 one's; acknowledged but not on disk (or changed): {lost:?}"
            );
            mid_save += 1;
            state = one_more;
        }
        assert_eq!(loaded.project.classes, classes, "round {round}");
        // Nothing but the project and perhaps the temp file of an interrupted save lies in `.hegraph/`.
        let tmp = temp_path(&project_path);
        for e in std::fs::read_dir(project_path.parent().unwrap())
            .unwrap()
            .flatten()
        {
            let p = e.path();
            assert!(
                p == project_path || p == tmp,
                "round {round}: unexpected {}",
                p.display()
            );
        }
    }
    // The rounds must actually have killed the child mid-work, or the test proved nothing.
    assert!(
        killed >= ROUNDS as usize / 2,
        "only {killed} of {ROUNDS} rounds were killed"
    );
    println!(
        "{ROUNDS} rounds: {killed} killed, {acked_total} acknowledged actions, {mid_save} kills after a save's \
         rename but before its ack"
    );
}
