//! `hegraph search PATH "phrase" [--top N]`: images ranked by CLIP similarity to a phrase, best first, one
//! `score<TAB>path` line each on stdout; timings and notes on stderr.
//!
//! A folder needs no classes (a flat folder of photos is searched as it is): its images are embedded through
//! the feature cache, so only new images cost CLIP time. A features file has no images to embed; its rows are
//! searched when the phrase can be matched to them honestly: a class name of the file with the file's own
//! text features, or any phrase through the very CLIP model the file records in its metadata.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use hegraph::data;
use hegraph::extract::{EmbedOptions, Embedder};
use hegraph::features::FeatureSet;
use hegraph::progress::CancelToken;
use hegraph::similarity::{cosine_scores, rank};

use super::{load_model, skipped_report, Bar, SearchArgs};

pub fn cmd_search(a: SearchArgs) -> Result<()> {
    if a.phrase.trim().is_empty() {
        bail!("the phrase is empty: say what to look for, e.g. \"a dog on a beach\"");
    }
    if a.path.is_file() {
        search_features(&a)
    } else {
        search_folder(&a)
    }
}

fn search_folder(a: &SearchArgs) -> Result<()> {
    let ds = data::list_images(&a.path).with_context(|| format!("opening {}", a.path.display()))?;
    for p in ds
        .problems
        .iter()
        .filter(|p| !p.message.contains("not an image file"))
    {
        eprintln!("warning: {p}");
    }
    let model = load_model(&a.model)?;
    let test_checkpoint = model.info().is_test_checkpoint;
    let e = Embedder::new(
        model,
        EmbedOptions {
            cache_dir: a.model.cache_dir.clone(),
            ..Default::default()
        },
    )?;
    for w in e.cache_warnings() {
        eprintln!("warning: {w}");
    }
    let paths: Vec<PathBuf> = ds.images.iter().map(|i| i.path.clone()).collect();
    let (feats, stats) = {
        let bar = Bar::new();
        e.embed_images(&paths, &[0], &bar, &CancelToken::new())?
    };
    if !stats.problems.is_empty() {
        eprint!("{}", skipped_report(&stats.problems));
    }
    let centre = feats.per_view.into_iter().next().unwrap_or_default();
    let t = Instant::now();
    let query = e.embed_phrase(&a.phrase)?;
    let embed_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let scores = cosine_scores(&centre, &query)?;
    let order = rank(&scores, a.top);
    let rank_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut out = String::new();
    for &i in &order {
        if let Some(s) = scores[i] {
            out.push_str(&format!("{s:.4}\t{}\n", ds.images[i].path.display()));
        }
    }
    print!("{out}");
    eprintln!(
        "{} images ranked in {rank_ms:.2} ms; the phrase took {embed_ms:.1} ms to embed (cached for next time); \
         images: {} embedded now, {} from the cache",
        scores.iter().flatten().count(),
        stats.features_computed,
        stats.features_from_cache
    );
    if test_checkpoint {
        eprintln!(
            "TEST CHECKPOINT (random weights): this ranking means nothing; give real CLIP weights with --model"
        );
    }
    Ok(())
}

fn search_features(a: &SearchArgs) -> Result<()> {
    let fs = FeatureSet::load(&a.path)?;
    let (feats, rows) = fs.image_rows();
    let phrase = a.phrase.trim();
    let class = fs
        .classes
        .iter()
        .position(|c| c.eq_ignore_ascii_case(phrase));
    let t = Instant::now();
    let (query, how) = match (class, &fs.text, &fs.model) {
        (Some(c), Some(text), _) => (
            text.row(c).to_vec(),
            format!(
                "the file's own text feature of the class '{}'",
                fs.classes[c]
            ),
        ),
        (_, _, Some(id)) => {
            let model = load_model(&a.model)?;
            if model.info().id != *id {
                bail!(
                    "{}: its features come from the CLIP model {id}, but the model found is {}; a phrase \
                     embedded by another model does not match them. Give that model with --model DIR",
                    a.path.display(),
                    model.info().id
                );
            }
            let e = Embedder::new(
                model,
                EmbedOptions {
                    cache_dir: a.model.cache_dir.clone(),
                    ..Default::default()
                },
            )?;
            (e.embed_phrase(phrase)?, "CLIP's text encoder".to_string())
        }
        (_, text, None) => {
            let names = fs
                .classes
                .iter()
                .take(8)
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(", ");
            let why = if text.is_some() {
                format!("'{phrase}' is not one of its class names ({names}, …)")
            } else {
                format!("'{phrase}' cannot be matched: the file holds no text features")
            };
            bail!(
                "{}: {why}, and the file does not record which CLIP model made its image features (metadata \
                 `model`), so no text encoder can be trusted to match them. Search for a class name of a file \
                 with text features, or make the file with `hegraph extract`, which records its model",
                a.path.display()
            );
        }
    };
    let embed_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let scores = cosine_scores(&feats, &query)?;
    let order = rank(&scores, a.top);
    let rank_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut out = String::new();
    for &i in &order {
        let Some(s) = scores[i] else { continue };
        let r = &rows[i];
        let class = r
            .label
            .and_then(|l| fs.classes.get(l))
            .map_or("-", String::as_str);
        let path = r
            .path
            .as_deref()
            .map(hegraph::stored_path::display)
            .unwrap_or_default();
        out.push_str(&format!(
            "{s:.4}\t{}[{}]\t{class}\t{path}\n",
            r.split, r.index
        ));
    }
    print!("{out}");
    eprintln!(
        "{} rows ranked in {rank_ms:.2} ms by {how} ({embed_ms:.1} ms to get it)",
        scores.iter().flatten().count()
    );
    if fs.test_checkpoint {
        eprintln!("TEST CHECKPOINT features (random weights): this ranking means nothing");
    }
    Ok(())
}
