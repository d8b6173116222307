//! The look: a calm dark theme with one accent colour, and a stable colour per class (the same class keeps its
//! colour in the grid, the confidence bars and the charts).

use egui::{Color32, CornerRadius, FontId, Stroke, TextStyle};

pub const ACCENT: Color32 = Color32::from_rgb(86, 156, 255);
pub const WARNING_BG: Color32 = Color32::from_rgb(120, 30, 30);
pub const WARNING_FG: Color32 = Color32::from_rgb(255, 226, 160);
pub const OK: Color32 = Color32::from_rgb(110, 200, 130);
/// The panels' background.
pub const PANEL: Color32 = Color32::from_rgb(27, 29, 34);

/// Twelve well-separated colours (Tableau-like, lifted for a dark background); beyond twelve classes the hue
/// walks the golden angle so neighbours still differ.
const PALETTE: [Color32; 12] = [
    Color32::from_rgb(88, 160, 255),
    Color32::from_rgb(255, 160, 70),
    Color32::from_rgb(96, 206, 120),
    Color32::from_rgb(240, 98, 98),
    Color32::from_rgb(182, 140, 240),
    Color32::from_rgb(200, 150, 110),
    Color32::from_rgb(245, 140, 200),
    Color32::from_rgb(170, 170, 170),
    Color32::from_rgb(215, 215, 90),
    Color32::from_rgb(70, 210, 220),
    Color32::from_rgb(150, 190, 255),
    Color32::from_rgb(255, 200, 150),
];

pub fn class_color(i: usize) -> Color32 {
    if i < PALETTE.len() {
        return PALETTE[i];
    }
    let h = (i as f32 * 0.618_034).fract();
    egui::ecolor::Hsva::new(h, 0.55, 0.95, 1.0).into()
}

/// Installs the theme on a context. The monospace font (Hack) is added as a fallback of the proportional one
/// for its arrows and shapes (← ↑ → ↓ ▶ ● …), which the default proportional font lacks.
pub fn apply(ctx: &egui::Context) {
    let mut fonts = egui::FontDefinitions::default();
    let mono = fonts
        .families
        .get(&egui::FontFamily::Monospace)
        .and_then(|f| f.first())
        .cloned();
    if let (Some(mono), Some(prop)) = (
        mono,
        fonts.families.get_mut(&egui::FontFamily::Proportional),
    ) {
        if !prop.contains(&mono) {
            prop.push(mono);
        }
    }
    ctx.set_fonts(fonts);
    ctx.set_theme(egui::Theme::Dark);
    ctx.style_mut_of(egui::Theme::Dark, |style| {
        style.text_styles = [
            (TextStyle::Small, FontId::proportional(11.5)),
            (TextStyle::Body, FontId::proportional(14.0)),
            (TextStyle::Button, FontId::proportional(14.0)),
            (TextStyle::Heading, FontId::proportional(19.0)),
            (TextStyle::Monospace, FontId::monospace(13.0)),
        ]
        .into();
        style.spacing.item_spacing = egui::vec2(8.0, 6.0);
        style.spacing.button_padding = egui::vec2(9.0, 4.0);
        style.spacing.interact_size.y = 24.0;
        let v = &mut style.visuals;
        v.panel_fill = PANEL;
        v.window_fill = Color32::from_rgb(33, 36, 42);
        v.extreme_bg_color = Color32::from_rgb(19, 20, 24);
        v.faint_bg_color = Color32::from_rgb(36, 39, 46);
        v.selection.bg_fill = ACCENT.gamma_multiply(0.55);
        v.selection.stroke = Stroke::new(1.5, ACCENT);
        v.hyperlink_color = ACCENT;
        v.window_corner_radius = CornerRadius::same(8);
        v.menu_corner_radius = CornerRadius::same(6);
        for w in [
            &mut v.widgets.inactive,
            &mut v.widgets.hovered,
            &mut v.widgets.active,
            &mut v.widgets.open,
            &mut v.widgets.noninteractive,
        ] {
            w.corner_radius = CornerRadius::same(5);
        }
        v.widgets.inactive.weak_bg_fill = Color32::from_rgb(46, 50, 58);
        v.widgets.inactive.bg_fill = Color32::from_rgb(46, 50, 58);
        v.widgets.hovered.weak_bg_fill = Color32::from_rgb(60, 66, 78);
        v.widgets.noninteractive.bg_stroke = Stroke::new(1.0, Color32::from_rgb(48, 52, 60));
    });
}

/// Seconds as "12 s", "3 min", "2 h".
pub fn short_duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 90.0 {
        format!("{secs:.0} s")
    } else if secs < 5400.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// "just now", "12 s ago", "3 min ago" for a number of seconds in the past.
pub fn ago(secs: u64) -> String {
    const DAY: u64 = 24 * 3600;
    match secs {
        0..5 => "just now".to_string(),
        s if s < 2 * DAY => format!("{} ago", short_duration(s as f64)),
        s => format!("{} days ago", s / DAY),
    }
}

/// In a window, the panels are not painted: the window is cleared to [`PANEL`] instead
/// ([`window_clear_color`]), which a GPU does in one fill. Why: on a software renderer (Mesa's lavapipe,
/// llvmpipe) every painted panel is shaded pixel by pixel, and the panels cover the whole window: measured
/// under Xvfb on the development machine, the welcome page's whole frame went from 36 to 9 ms and the demo
/// folder's labelling view from 64 to 41 ms (`BENCHMARKS.md`, "GUI frame time"); the picture is the same.
/// Not for the headless test renderer, which clears to transparent: there the panels stay painted.
pub fn panels_from_the_clear_color(ctx: &egui::Context) {
    ctx.style_mut_of(egui::Theme::Dark, |style| {
        style.visuals.panel_fill = Color32::TRANSPARENT;
    });
}

/// What the window is cleared to before the UI is drawn (see [`panels_from_the_clear_color`]).
pub fn window_clear_color() -> [f32; 4] {
    PANEL.to_normalized_gamma_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_colours_differ_and_durations_read_well() {
        for i in 0..40 {
            assert_ne!(class_color(i), class_color(i + 1));
        }
        assert_eq!(short_duration(0.25), "250 ms");
        assert_eq!(short_duration(12.0), "12 s");
        assert_eq!(short_duration(600.0), "10 min");
        assert_eq!(short_duration(7200.0), "2.0 h");
        assert_eq!(ago(2), "just now");
        assert_eq!(ago(30), "30 s ago");
    }

    /// The window clears to exactly the colour the panels are painted with elsewhere, so the picture does not
    /// change; and afterwards no panel paints.
    #[test]
    fn the_window_clears_to_the_panel_colour_and_panels_stop_painting() {
        let ctx = egui::Context::default();
        apply(&ctx);
        let painted = ctx.style_of(egui::Theme::Dark).visuals.panel_fill;
        assert_eq!(painted, PANEL);
        assert_eq!(window_clear_color(), painted.to_normalized_gamma_f32());
        panels_from_the_clear_color(&ctx);
        assert_eq!(
            ctx.style_of(egui::Theme::Dark).visuals.panel_fill,
            Color32::TRANSPARENT
        );
    }
}
