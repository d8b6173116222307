//! The training view's charts as PNG files a person can open or paste into a report: accuracy against the
//! number of labels, and a confusion matrix. Drawn pixel by pixel with the `image` crate (no GUI needed, so
//! the same files come from a headless run), numbers in a built-in 3×5 digit font scaled up; classes are
//! numbered from 1 as their keys are, in the project's order.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("nothing to draw: {0}")]
    Empty(&'static str),
    #[error("{}: cannot write the PNG: {source}", path.display())]
    Write {
        path: PathBuf,
        source: image::ImageError,
    },
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 48]);
const GRID: Rgb<u8> = Rgb([222, 224, 230]);
const LINE: Rgb<u8> = Rgb([40, 110, 220]);

/// Rows of 3 bits (left = 4) per glyph.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '%' => [5, 1, 2, 4, 5],
        '-' => [0, 0, 7, 0, 0],
        ' ' => [0, 0, 0, 0, 0],
        _ => return None,
    })
}

/// Width in pixels of `text` at `scale` (each glyph 3 wide plus 1 of space).
fn text_width(text: &str, scale: u32) -> u32 {
    (text.chars().count() as u32 * 4).saturating_sub(1) * scale
}

fn fill(img: &mut RgbImage, x0: i64, y0: i64, w: i64, h: i64, c: Rgb<u8>) {
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..(y0 + h).min(ih) {
        for x in x0.max(0)..(x0 + w).min(iw) {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// `text` with its top-left corner at (x, y); characters without a glyph are left blank.
fn draw_text(img: &mut RgbImage, text: &str, x: i64, y: i64, scale: u32, c: Rgb<u8>) {
    let s = scale as i64;
    for (k, ch) in text.chars().enumerate() {
        let Some(g) = glyph(ch) else { continue };
        let gx = x + k as i64 * 4 * s;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    fill(img, gx + col * s, y + row as i64 * s, s, s, c);
                }
            }
        }
    }
}

/// A line `width` pixels thick from a to b.
fn draw_line(img: &mut RgbImage, a: (f32, f32), b: (f32, f32), width: i64, c: Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for k in 0..=steps {
        let t = k as f32 / steps as f32;
        let x = a.0 + (b.0 - a.0) * t;
        let y = a.1 + (b.1 - a.1) * t;
        fill(
            img,
            x.round() as i64 - width / 2,
            y.round() as i64 - width / 2,
            width,
            width,
            c,
        );
    }
}

/// Accuracy (0–1) against the number of labels, one point per training, in the order given.
pub fn accuracy_chart(points: &[(usize, f32)]) -> Result<RgbImage, ChartError> {
    if points.is_empty() {
        return Err(ChartError::Empty("no accuracy was measured yet"));
    }
    let (w, h) = (900u32, 520u32);
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    let (left, right, top, bottom) = (90.0f32, 30.0f32, 30.0f32, 70.0f32);
    let pw = w as f32 - left - right;
    let ph = h as f32 - top - bottom;
    let xmin = points.iter().map(|p| p.0).min().unwrap_or(0) as f32;
    let xmax = points.iter().map(|p| p.0).max().unwrap_or(1) as f32;
    let (xmin, xmax) = if xmax > xmin {
        (xmin, xmax)
    } else {
        (xmin - 1.0, xmax + 1.0)
    };
    let sx = |x: f32| left + (x - xmin) / (xmax - xmin) * pw;
    let sy = |a: f32| top + (1.0 - a.clamp(0.0, 1.0)) * ph;
    for k in 0..=5 {
        let a = k as f32 / 5.0;
        let y = sy(a);
        draw_line(&mut img, (left, y), (left + pw, y), 1, GRID);
        let t = format!("{:.0}%", a * 100.0);
        draw_text(
            &mut img,
            &t,
            (left - 12.0) as i64 - text_width(&t, 3) as i64,
            y as i64 - 7,
            3,
            INK,
        );
    }
    // Ticks at up to 6 label counts, rounded.
    let ticks = 6usize;
    let mut last = None;
    for k in 0..=ticks {
        let v = (xmin + (xmax - xmin) * k as f32 / ticks as f32).round();
        if last == Some(v) {
            continue;
        }
        last = Some(v);
        let x = sx(v);
        draw_line(&mut img, (x, top + ph), (x, top + ph + 8.0), 2, INK);
        let t = format!("{v:.0}");
        draw_text(
            &mut img,
            &t,
            x as i64 - text_width(&t, 3) as i64 / 2,
            (top + ph + 16.0) as i64,
            3,
            INK,
        );
    }
    draw_line(&mut img, (left, top), (left, top + ph), 2, INK);
    draw_line(&mut img, (left, top + ph), (left + pw, top + ph), 2, INK);
    let pts: Vec<(f32, f32)> = points.iter().map(|&(x, a)| (sx(x as f32), sy(a))).collect();
    for pair in pts.windows(2) {
        draw_line(&mut img, pair[0], pair[1], 3, LINE);
    }
    for &(x, y) in &pts {
        fill(&mut img, x as i64 - 5, y as i64 - 5, 11, 11, LINE);
    }
    Ok(img)
}

/// `m[label][predicted]` counts as a heat map (each row's share), counts written in the cells that fit them,
/// class numbers along the top (prediction) and the left (label).
pub fn confusion_chart(m: &[Vec<usize>]) -> Result<RgbImage, ChartError> {
    let c = m.len();
    if c == 0 || m.iter().all(|r| r.iter().all(|&x| x == 0)) {
        return Err(ChartError::Empty("no cross-validated prediction yet"));
    }
    let cell = (640 / c as u32).clamp(6, 64);
    let margin = 70u32;
    let side = margin + cell * c as u32 + 20;
    let mut img = RgbImage::from_pixel(side, side, WHITE);
    let digit_scale = if cell >= 40 { 3 } else { 2 };
    for (i, row) in m.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f32;
        for (j, &n) in row.iter().enumerate().take(c) {
            let share = n as f32 / total;
            // White → blue on the diagonal, white → red off it: errors stand out.
            let (r, g, b) = if i == j {
                (40.0, 110.0, 220.0)
            } else {
                (220.0, 60.0, 50.0)
            };
            let mix = |full: f32| (255.0 - (255.0 - full) * share).round() as u8;
            let x = (margin + j as u32 * cell) as i64;
            let y = (margin + i as u32 * cell) as i64;
            let cs = cell as i64;
            fill(
                &mut img,
                x,
                y,
                cs - 1,
                cs - 1,
                Rgb([mix(r), mix(g), mix(b)]),
            );
            let t = n.to_string();
            if n > 0 && text_width(&t, digit_scale) + 4 <= cell && 5 * digit_scale + 4 <= cell {
                let ink = if share > 0.55 { WHITE } else { INK };
                draw_text(
                    &mut img,
                    &t,
                    x + (cs - text_width(&t, digit_scale) as i64) / 2,
                    y + (cs - 5 * digit_scale as i64) / 2,
                    digit_scale,
                    ink,
                );
            }
        }
    }
    // Class numbers where they fit (every k-th when the cells are small).
    let every = (16 / cell.max(1) + 1) as usize;
    for k in (0..c).step_by(every) {
        let t = (k + 1).to_string();
        let centre = (margin + k as u32 * cell + cell / 2) as i64;
        draw_text(
            &mut img,
            &t,
            centre - text_width(&t, 2) as i64 / 2,
            margin as i64 - 16,
            2,
            INK,
        );
        draw_text(
            &mut img,
            &t,
            margin as i64 - 10 - text_width(&t, 2) as i64,
            centre - 5,
            2,
            INK,
        );
    }
    Ok(img)
}

pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), ChartError> {
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| ChartError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accuracy_line_rises_where_the_accuracy_does() {
        let img = accuracy_chart(&[(4, 0.25), (10, 0.5), (20, 1.0)]).unwrap();
        // The line's colour: its highest pixel lies right of its lowest.
        let blue: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| **p == LINE)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(blue.len() > 500);
        let top = blue.iter().min_by_key(|p| p.1).unwrap();
        let bottom = blue.iter().max_by_key(|p| p.1).unwrap();
        assert!(top.0 > bottom.0, "{top:?} {bottom:?}");
        assert!(accuracy_chart(&[]).is_err());
        // One training: still a picture.
        accuracy_chart(&[(3, 0.6)]).unwrap();
    }

    #[test]
    fn the_confusion_matrix_is_blue_on_the_diagonal_and_red_off_it() {
        let img = confusion_chart(&[vec![3, 0], vec![1, 2]]).unwrap();
        let cell = 64i64;
        let at =
            |i: i64, j: i64| *img.get_pixel((70 + j * cell + 4) as u32, (70 + i * cell + 4) as u32);
        assert_eq!(
            at(0, 0),
            Rgb([40, 110, 220]),
            "a full row share is the full colour"
        );
        assert_eq!(at(0, 1), WHITE);
        let off = at(1, 0);
        assert!(off[0] > off[2], "off-diagonal is red: {off:?}");
        assert!(confusion_chart(&[vec![0]]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        save_png(&img, &p).unwrap();
        assert_eq!(image::open(&p).unwrap().width(), img.width());
        let bad = dir.path().join("no-such-dir").join("c.png");
        let e = save_png(&img, &bad).unwrap_err().to_string();
        assert!(e.contains("no-such-dir"), "{e}");
    }
}
