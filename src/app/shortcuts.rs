//! The keyboard: every key press of a frame becomes an [`Action`], and the actions are applied one by one, in
//! the order they were typed, each to the state the previous one left.
//!
//! Why not `consume_key` per shortcut: it answers "was this key pressed this frame", so when keys arrive faster
//! than frames (a software renderer takes 100–200 ms per frame; `xdotool key --delay 5 n 2 n 3` is one frame)
//! every digit was applied before any N moved the cursor, and the digits relabelled whatever images the
//! auto-advance reached, human labels included.

use egui::{Event, Key, Modifiers};

use super::View;

/// What one key press asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    OpenFolder,
    Save,
    Quit,
    Show(View),
    ToggleHelp,
    ToggleFrameStats,
    FocusSearch,
    Undo,
    Redo,
    SelectAll,
    /// Close the window on top (help, settings, export), else clear the selection.
    Escape,
    Train,
    /// Label the targets with class `Some(c)`, or remove their labels.
    Label(Option<usize>),
    LabelNext,
    ClassPicker,
    /// Show all → unlabelled → labelled images.
    CycleShow,
    /// The next sort order.
    CycleSort,
    /// Move the cursor by this many positions in the visible order.
    Move(isize),
    /// The cursor image at full size ([`super::image_viewer`]).
    OpenViewer,
    /// The search box in its CLIP text mode ([`super::search`]).
    FocusClipSearch,
    /// Sort by similarity to the selected image(s).
    MoreLikeThis,
    /// The near-duplicates window.
    NearDuplicates,
    /// "Accept predictions ≥ X %" ([`super::bulk_accept`]).
    AcceptPredictions,
    /// The map's other layout (PCA ↔ t-SNE, [`super::map_view`]).
    ToggleMapLayout,
}

/// What the mapping from keys to actions depends on.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyContext {
    /// A text field has the keyboard: only the keys that work everywhere are shortcuts.
    pub text_focus: bool,
    pub view: View,
    /// Columns of the grid (the step of ↑ and ↓).
    pub cols: usize,
    /// Classes of the open project (digits beyond them do nothing).
    pub classes: usize,
}

pub(super) const DIGITS: [Key; 9] = [
    Key::Num1,
    Key::Num2,
    Key::Num3,
    Key::Num4,
    Key::Num5,
    Key::Num6,
    Key::Num7,
    Key::Num8,
    Key::Num9,
];

/// Where a binding works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scope {
    /// Everywhere, also while a text field has the keyboard.
    Anywhere,
    /// Unless a text field has the keyboard.
    NotTyping,
    /// In the labelling view, without Ctrl or Alt, unless a text field has the keyboard.
    Grid,
    /// In the map view, without Ctrl or Alt, unless a text field has the keyboard.
    Map,
}

/// Steps of the cursor; the vertical ones depend on the grid's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Left,
    Right,
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
}

/// What a binding does; the digits and the cursor keys are families resolved with the [`KeyContext`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Act {
    Do(Action),
    /// The digit's class (1 = the first), when the project has it.
    Digit,
    Move(Step),
}

/// One entry of the key table: the keys, where they work, what they do, and the line F1 shows.
pub(super) struct Binding {
    pub chords: &'static [(Modifiers, Key)],
    pub scope: Scope,
    pub act: Act,
    pub help: &'static str,
}

const NONE: Modifiers = Modifiers::NONE;
const CMD: Modifiers = Modifiers::COMMAND;
const CMD_SHIFT: Modifiers = Modifiers::COMMAND.plus(Modifiers::SHIFT);
const SHIFT: Modifiers = Modifiers::SHIFT;

const fn digits() -> [(Modifiers, Key); 9] {
    let mut out = [(NONE, Key::Num1); 9];
    let mut i = 0;
    while i < 9 {
        out[i] = (NONE, DIGITS[i]);
        i += 1;
    }
    out
}

const DIGIT_CHORDS: [(Modifiers, Key); 9] = digits();

/// Every key the app handles, in the order they are tried (Ctrl+Shift+Z before Ctrl+Z: a pattern without
/// Shift also matches with it). The F1 window is generated from this table, so it lists exactly what works.
pub(super) const BINDINGS: &[Binding] = &[
    Binding {
        chords: &[(CMD, Key::O)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::OpenFolder),
        help: "open an image folder",
    },
    Binding {
        chords: &[(CMD, Key::S)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::Save),
        help: "save now (the project also saves after every label)",
    },
    Binding {
        chords: &[(CMD, Key::Q)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::Quit),
        help: "quit (everything is saved already)",
    },
    Binding {
        chords: &[(CMD, Key::Num1)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::Show(View::Label)),
        help: "Label view",
    },
    Binding {
        chords: &[(CMD, Key::Num2)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::Show(View::Graph)),
        help: "Graph view",
    },
    Binding {
        chords: &[(CMD, Key::Num3)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::Show(View::Train)),
        help: "Train view",
    },
    Binding {
        chords: &[(CMD_SHIFT, Key::F)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::FocusClipSearch),
        help: "search by meaning: a phrase ranked with CLIP's text encoder (Enter searches)",
    },
    Binding {
        chords: &[(CMD, Key::Num4)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::Show(View::Map)),
        help: "Map view",
    },
    Binding {
        chords: &[(CMD, Key::F)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::FocusSearch),
        help: "search the file names",
    },
    Binding {
        chords: &[(NONE, Key::F1)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::ToggleHelp),
        help: "this list",
    },
    Binding {
        chords: &[(NONE, Key::F12)],
        scope: Scope::Anywhere,
        act: Act::Do(Action::ToggleFrameStats),
        help: "show the UI's time per frame",
    },
    Binding {
        chords: &[(NONE, Key::Questionmark), (SHIFT, Key::Questionmark)],
        scope: Scope::NotTyping,
        act: Act::Do(Action::ToggleHelp),
        help: "this list",
    },
    Binding {
        chords: &[(CMD_SHIFT, Key::Z), (CMD, Key::Y)],
        scope: Scope::NotTyping,
        act: Act::Do(Action::Redo),
        help: "redo a labelling action",
    },
    Binding {
        chords: &[(CMD, Key::Z)],
        scope: Scope::NotTyping,
        act: Act::Do(Action::Undo),
        help: "undo a labelling action",
    },
    Binding {
        chords: &[(CMD, Key::A)],
        scope: Scope::NotTyping,
        act: Act::Do(Action::SelectAll),
        help: "select every image shown",
    },
    Binding {
        chords: &[(NONE, Key::Escape)],
        scope: Scope::NotTyping,
        act: Act::Do(Action::Escape),
        help: "close the window on top, else clear the selection (a job has its own Cancel button)",
    },
    Binding {
        chords: &[(NONE, Key::T)],
        scope: Scope::NotTyping,
        act: Act::Do(Action::Train),
        help: "train on the labelled images",
    },
    Binding {
        chords: &DIGIT_CHORDS,
        scope: Scope::Grid,
        act: Act::Digit,
        help: "label the selected image(s) with class 1 … 9",
    },
    Binding {
        chords: &[
            (NONE, Key::Num0),
            (NONE, Key::Backspace),
            (NONE, Key::Delete),
        ],
        scope: Scope::Grid,
        act: Act::Do(Action::Label(None)),
        help: "remove the label",
    },
    Binding {
        chords: &[(NONE, Key::N)],
        scope: Scope::Grid,
        act: Act::Do(Action::LabelNext),
        help: "next: the unlabelled image the model is least sure about",
    },
    Binding {
        chords: &[(NONE, Key::Slash), (NONE, Key::L)],
        scope: Scope::Grid,
        act: Act::Do(Action::ClassPicker),
        help: "class picker (any class, by name)",
    },
    Binding {
        chords: &[(NONE, Key::V)],
        scope: Scope::Grid,
        act: Act::Do(Action::CycleShow),
        help: "show all / unlabelled / labelled images / likely mistakes",
    },
    Binding {
        chords: &[(NONE, Key::A)],
        scope: Scope::Grid,
        act: Act::Do(Action::AcceptPredictions),
        help: "accept every prediction at least X % sure (asks, shows the count first)",
    },
    Binding {
        chords: &[(NONE, Key::S)],
        scope: Scope::Grid,
        act: Act::Do(Action::CycleSort),
        help: "next sort order",
    },
    Binding {
        chords: &[(NONE, Key::M)],
        scope: Scope::Grid,
        act: Act::Do(Action::MoreLikeThis),
        help: "more like this: sort by similarity to the selected image(s)",
    },
    Binding {
        chords: &[(NONE, Key::D)],
        scope: Scope::Grid,
        act: Act::Do(Action::NearDuplicates),
        help: "near-duplicates: groups of look-alike images, labelled or skipped whole",
    },
    Binding {
        chords: &[(NONE, Key::P)],
        scope: Scope::Map,
        act: Act::Do(Action::ToggleMapLayout),
        help: "map: switch the layout between PCA and t-SNE",
    },
    Binding {
        chords: &[(NONE, Key::Space)],
        scope: Scope::Grid,
        act: Act::Do(Action::OpenViewer),
        help: "the image at full size (wheel or +/− zoom, drag pans, F fits, ←/→ next, 1–9 label, Esc closes)",
    },
    Binding {
        chords: &[(NONE, Key::ArrowLeft)],
        scope: Scope::Grid,
        act: Act::Move(Step::Left),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::ArrowRight)],
        scope: Scope::Grid,
        act: Act::Move(Step::Right),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::ArrowUp)],
        scope: Scope::Grid,
        act: Act::Move(Step::Up),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::ArrowDown)],
        scope: Scope::Grid,
        act: Act::Move(Step::Down),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::PageUp)],
        scope: Scope::Grid,
        act: Act::Move(Step::PageUp),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::PageDown)],
        scope: Scope::Grid,
        act: Act::Move(Step::PageDown),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::Home)],
        scope: Scope::Grid,
        act: Act::Move(Step::Home),
        help: "move through the grid",
    },
    Binding {
        chords: &[(NONE, Key::End)],
        scope: Scope::Grid,
        act: Act::Move(Step::End),
        help: "move through the grid",
    },
];

/// The action of one key press, or `None` when the key is not a shortcut here (it stays for the widgets).
pub(super) fn action_for(key: Key, mods: Modifiers, cx: &KeyContext) -> Option<Action> {
    let plain = mods.matches_logically(Modifiers::NONE);
    BINDINGS.iter().find_map(|b| {
        let in_scope = match b.scope {
            Scope::Anywhere => true,
            Scope::NotTyping => !cx.text_focus,
            Scope::Grid => !cx.text_focus && matches!(cx.view, View::Label | View::Map) && plain,
            Scope::Map => !cx.text_focus && cx.view == View::Map && plain,
        };
        let chord = b
            .chords
            .iter()
            .position(|&(m, k)| k == key && mods.matches_logically(m))?;
        if !in_scope {
            return None;
        }
        let cols = cx.cols.max(1) as isize;
        match b.act {
            Act::Do(a) => Some(a),
            Act::Digit => (chord < cx.classes).then_some(Action::Label(Some(chord))),
            Act::Move(step) => Some(Action::Move(match step {
                Step::Left => -1,
                Step::Right => 1,
                Step::Up => -cols,
                Step::Down => cols,
                Step::PageUp => -cols * 4,
                Step::PageDown => cols * 4,
                Step::Home => isize::MIN / 2,
                Step::End => isize::MAX / 2,
            })),
        }
    })
}

/// The F1 list: one row per distinct help text, its keys as a person reads them, generated from
/// [`BINDINGS`].
pub(super) fn help_rows() -> Vec<(String, &'static str)> {
    let mut rows: Vec<(Vec<String>, &'static str)> = Vec::new();
    for b in BINDINGS {
        let keys: Vec<String> = if b.act == Act::Digit {
            vec!["1 … 9".to_string()]
        } else {
            b.chords.iter().map(|&(m, k)| chord_name(m, k)).collect()
        };
        match rows.iter_mut().find(|r| r.1 == b.help) {
            Some(r) => {
                for k in keys {
                    if !r.0.contains(&k) {
                        r.0.push(k);
                    }
                }
            }
            None => rows.push((keys, b.help)),
        }
    }
    rows.into_iter().map(|(k, h)| (k.join(", "), h)).collect()
}

/// The full-size viewer's rows of the F1 list, from its own table ([`super::image_viewer::VIEWER_KEYS`]).
pub(super) fn viewer_help_rows() -> Vec<(String, &'static str)> {
    super::image_viewer::VIEWER_KEYS
        .iter()
        .map(|(keys, _, help)| {
            let names: Vec<String> = keys.iter().map(|&k| chord_name(NONE, k)).collect();
            (names.join(", "), *help)
        })
        .collect()
}

fn chord_name(mods: Modifiers, key: Key) -> String {
    let k = match key {
        Key::ArrowLeft => "←",
        Key::ArrowRight => "→",
        Key::ArrowUp => "↑",
        Key::ArrowDown => "↓",
        Key::Questionmark => "?",
        Key::Slash => "/",
        Key::Plus => "+",
        Key::Equals => "=",
        Key::Minus => "−",
        other => other.name(),
    };
    // Shift on "?" is how it is typed on most layouts, not a different chord.
    if mods.is_none() || (mods == SHIFT && key == Key::Questionmark) {
        k.to_string()
    } else {
        let m = egui::ModifierNames::NAMES.format(&mods, cfg!(target_os = "macos"));
        format!("{m}+{k}")
    }
}

/// The action of one input event: a key press that is a shortcut in `cx`.
pub(super) fn action_of(e: &Event, cx: &KeyContext) -> Option<Action> {
    match e {
        Event::Key {
            key,
            pressed: true,
            modifiers,
            ..
        } => action_for(*key, *modifiers, cx),
        _ => None,
    }
}

/// Input a person gave to the window while something else had their attention (a native file dialog): keys,
/// text, clicks and clipboard events, which must not reach the grid afterwards.
pub(super) fn is_user_input(e: &Event) -> bool {
    matches!(
        e,
        Event::Key { .. }
            | Event::Text(_)
            | Event::Paste(_)
            | Event::Copy
            | Event::Cut
            | Event::PointerButton { .. }
            | Event::Ime(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> KeyContext {
        KeyContext {
            text_focus: false,
            view: View::Label,
            cols: 5,
            classes: 3,
        }
    }

    fn press(key: Key, modifiers: Modifiers) -> Event {
        Event::Key {
            key,
            physical_key: None,
            pressed: true,
            repeat: false,
            modifiers,
        }
    }

    #[test]
    fn keys_become_actions_in_the_order_typed() {
        let none = Modifiers::NONE;
        let events = [
            press(Key::N, none),
            press(Key::Num2, none),
            Event::Text("x".into()),
            press(Key::N, none),
            press(Key::Num3, none),
            press(Key::Num9, none),
            press(Key::ArrowDown, none),
        ];
        let actions: Vec<Action> = events.iter().filter_map(|e| action_of(e, &cx())).collect();
        assert_eq!(
            actions,
            [
                Action::LabelNext,
                Action::Label(Some(1)),
                Action::LabelNext,
                Action::Label(Some(2)),
                Action::Move(5),
            ]
        );
        // The text event and the digit beyond the classes are no shortcuts: they stay for the widgets.
        assert_eq!(action_of(&events[2], &cx()), None);
        assert_eq!(action_of(&events[5], &cx()), None);
    }

    #[test]
    fn every_key_of_the_table_does_what_its_help_says_and_none_is_shadowed() {
        for b in BINDINGS {
            // Each binding in a view where it works: the map's own keys in the map view.
            let view = if b.scope == Scope::Map {
                View::Map
            } else {
                View::Label
            };
            let cx = KeyContext {
                classes: 9,
                view,
                ..cx()
            };
            for (k, &(m, key)) in b.chords.iter().enumerate() {
                let got = action_for(key, m, &cx);
                let want = match b.act {
                    Act::Do(a) => Some(a),
                    Act::Digit => Some(Action::Label(Some(k))),
                    Act::Move(_) => got.filter(|a| matches!(a, Action::Move(_))),
                };
                assert!(
                    got.is_some() && got == want,
                    "{key:?} {m:?}: {got:?}, help says {}",
                    b.help
                );
            }
        }
        let rows = help_rows();
        let keys: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        for shown in [
            "Ctrl+Q",
            "Ctrl+F",
            "F1, ?",
            "Ctrl+Shift+Z, Ctrl+Y",
            "1 … 9",
            "V",
            "S",
            "M",
            "D",
            "Ctrl+Shift+F",
            "Escape",
            "P",
        ] {
            assert!(keys.contains(&shown), "{shown} missing from {keys:?}");
        }
        assert_eq!(
            rows.iter()
                .filter(|r| r.1 == "move through the grid")
                .count(),
            1,
            "one row per meaning"
        );
    }

    #[test]
    fn a_text_field_keeps_the_labelling_keys_but_not_the_global_ones() {
        let typing = KeyContext {
            text_focus: true,
            ..cx()
        };
        assert_eq!(action_for(Key::Num1, Modifiers::NONE, &typing), None);
        assert_eq!(action_for(Key::Z, Modifiers::COMMAND, &typing), None);
        assert_eq!(
            action_for(Key::S, Modifiers::COMMAND, &typing),
            Some(Action::Save)
        );
        let graph = KeyContext {
            view: View::Graph,
            ..cx()
        };
        assert_eq!(action_for(Key::Num1, Modifiers::NONE, &graph), None);
        assert_eq!(
            action_for(Key::T, Modifiers::NONE, &graph),
            Some(Action::Train)
        );
        // The map's layout key is the map view's only.
        assert_eq!(action_for(Key::P, Modifiers::NONE, &cx()), None);
        let map = KeyContext {
            view: View::Map,
            ..cx()
        };
        assert_eq!(
            action_for(Key::P, Modifiers::NONE, &map),
            Some(Action::ToggleMapLayout)
        );
        // Esc has one meaning: it never cancels a job.
        assert_eq!(
            action_for(Key::Escape, Modifiers::NONE, &cx()),
            Some(Action::Escape)
        );
        assert_eq!(
            action_for(Key::Z, Modifiers::COMMAND | Modifiers::SHIFT, &cx()),
            Some(Action::Redo)
        );
    }
}
