//! The graph view's page: which graph to show (the trained one, or the one the current labels give) and the
//! page around [`super::graph_view::GraphView`].

use egui::RichText;

use super::graph_view::{self, GraphAction};
use super::{state, HeGraphApp, Level, View};
use crate::graph::{GraphOptions, HeteroGraph, LabelledViewsRef};

impl HeGraphApp {
    /// Rebuilds the graph view when what it shows changed.
    fn refresh_graph(&mut self) {
        let Some(s) = &self.session else { return };
        let trained = self
            .engine
            .adapter
            .as_ref()
            .and_then(|a| a.graph().cloned());
        let key = (s.label_generation, self.engine.serial, trained.is_some());
        // A trained graph only changes with training; the live one with every label.
        let key = if trained.is_some() {
            (0, key.1, true)
        } else {
            key
        };
        if self.graph_key == Some(key) {
            return;
        }
        self.graph_key = Some(key);
        let graph = match trained {
            Some(g) => {
                self.graph_note = "graph of the last HeGraphAdapter training".into();
                Some(g)
            }
            None => self.live_graph(),
        };
        match graph {
            Some(g) => self.graph.set_graph(&g),
            None => self.graph.clear(),
        }
    }

    /// The graph the current labels give, with centre crops as the visual side (no training needed).
    fn live_graph(&mut self) -> Option<HeteroGraph> {
        let s = self.session.as_ref()?;
        let (centre, text) = (self.engine.centre.as_ref()?, self.engine.text.as_ref()?);
        let labelled: Vec<usize> = (0..s.len())
            .filter(|&i| s.label(i).is_some() && self.engine.ok.get(i).copied().unwrap_or(true))
            .collect();
        if labelled.is_empty() {
            self.graph_note = "label a few images to see the visual nodes and their edges".into();
            return None;
        }
        let views = vec![centre.select_rows(&labelled)];
        let labels: Vec<usize> = labelled.iter().filter_map(|&i| s.label(i)).collect();
        let use_neg = s.project.settings.train.use_negative;
        let g = HeteroGraph::build(
            s.classes(),
            text,
            if use_neg {
                self.engine.text_neg.as_deref()
            } else {
                None
            },
            &LabelledViewsRef {
                views: &views,
                labels: &labels,
            },
            &GraphOptions::default(),
        );
        match g {
            Ok(g) => {
                self.graph_note = "graph from the current labels (not trained yet)".into();
                Some(g)
            }
            Err(e) => {
                self.graph_note = format!("no graph: {e}");
                None
            }
        }
    }

    pub(super) fn graph_page(&mut self, ui: &mut egui::Ui) {
        self.refresh_graph();
        let classes: Vec<String> = self
            .session
            .as_ref()
            .map(|s| s.classes().to_vec())
            .unwrap_or_default();
        let confidence: Option<Vec<f32>> =
            self.session.as_ref().and_then(|s| match self.graph.sizing {
                graph_view::NodeSizing::Selected => s
                    .cursor
                    .and_then(|c| s.predictions().map(|p| p.row(c).to_vec())),
                _ => s.mean_confidence(),
            });
        let selected_name = self
            .session
            .as_ref()
            .and_then(|s| s.cursor.map(|c| s.images[c].rel.clone()));
        egui::Panel::left("hegraph-graph-controls")
            .resizable(false)
            .exact_size(270.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    ui.add_space(6.0);
                    self.graph.controls(ui, selected_name.as_deref());
                    ui.add_space(8.0);
                    ui.label(RichText::new(&self.graph_note).small().weak());
                });
            });
        egui::CentralPanel::default()
            .frame(egui::Frame::central_panel(ui.style()).inner_margin(8))
            .show(ui, |ui| {
                if let Some(GraphAction::ShowClass(c)) =
                    self.graph.canvas(ui, &classes, confidence.as_deref())
                {
                    if let Some(s) = self.session.as_mut() {
                        let f = state::GridFilter {
                            class: Some(c),
                            ..Default::default()
                        };
                        s.set_filter(f);
                    }
                    self.view = View::Label;
                    let name = classes.get(c).cloned().unwrap_or_default();
                    self.notify(Level::Info, format!("showing the images labelled '{name}'"));
                }
            });
    }
}
