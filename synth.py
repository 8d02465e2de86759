"""
The built-in corpus (prepare.py --dataset=synth, the default): pure numpy signals, and speech from
libespeak-ng. synth_clip(seed, i, max_dur) -> (wav at 24 kHz, info). Each clip's text is written
from what was synthesised: a caption, a description, labels, question-answer pairs and, for
speech, Morse and DTMF, a transcript. Kinds: speech (a quarter), music (notes, chords, melodies),
sound events, Morse words, DTMF digits, and mixtures of music and events.
"""

import ctypes
import os
import re
import sys

import numpy as np

SAMPLE_RATE = 24000     # = audio.SAMPLE_RATE (tests/test_prepare.py checks)

NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten"]
INSTRUMENTS = ["sine", "square", "sawtooth", "plucked string", "bell"]
INSTRUMENT_TEXT = {  # caption noun, adjectives for the description
    "sine": ("a sine tone", "pure, soft and smooth"),
    "square": ("a square wave", "hollow, buzzy and electronic"),
    "sawtooth": ("a sawtooth synth", "bright, brassy and harsh"),
    "plucked string": ("a plucked string",
                       "twangy, like a guitar or a harp, each note fading quickly"),
    "bell": ("a bell", "metallic and ringing, with a long shimmering decay"),
}
CHORDS = {"major": [0, 4, 7], "minor": [0, 3, 7], "diminished": [0, 3, 6], "augmented": [0, 4, 8]}
INTERVALS = {3: "minor third", 4: "major third", 5: "perfect fourth", 7: "perfect fifth",
             12: "octave"}
EVENTS = ["beep", "chirp", "noise burst", "click", "siren"]
EVENT_PLURAL = {"beep": "beeps", "chirp": "chirps", "noise burst": "noise bursts",
                "click": "clicks", "siren": "sirens"}
EVENT_TEXT = {
    "beep": "a short electronic beep",
    "chirp": "a rising chirp that sweeps up in pitch",
    "noise burst": "a burst of hissing noise",
    "click": "a sharp click",
    "siren": "a wailing siren",
}
MORSE = {"a": ".-", "b": "-...", "c": "-.-.", "d": "-..", "e": ".", "f": "..-.", "g": "--.",
         "h": "....", "i": "..", "j": ".---", "k": "-.-", "l": ".-..", "m": "--", "n": "-.",
         "o": "---", "p": ".--.", "q": "--.-", "r": ".-.", "s": "...", "t": "-", "u": "..-",
         "v": "...-", "w": ".--", "x": "-..-", "y": "-.--", "z": "--.."}
WORDS = ("sos ok hi yes no go on in up at it is to we me be do so cat dog sun red sea sky run one "
         "two ten top hat map car bus fox owl cow pig egg ice tea jam box key toy bed cup pen ink "
         "art arm leg eye ear cake fish bird tree rain snow wind fire star moon ship boat road "
         "home door book milk rice corn lamp song note bell drum harp time life love hope play "
         "stop help call send echo code data wave tone beat radio music hello night light water "
         "earth green house train ocean river").split()
DTMF_KEYS = "123456789*0#"
DTMF_LOW = {k: f for keys, f in [("123", 697), ("456", 770), ("789", 852), ("*0#", 941)]
            for k in keys}
DTMF_HIGH = {k: f for keys, f in [("147*", 1209), ("2580", 1336), ("369#", 1477)] for k in keys}
DTMF_WORDS = {**{str(i): NUMBER_WORDS[i] for i in range(10)}, "*": "star", "#": "pound"}

def midi_hz(m):
    return 440.0 * 2.0 ** ((m - 69) / 12.0)

def midi_name(m):
    return f"{NOTE_NAMES[m % 12]}{m // 12 - 1}"

def envelope(n, attack=0.01, release=0.05):
    a, r = max(1, int(attack * SAMPLE_RATE)), max(1, int(release * SAMPLE_RATE))
    env = np.ones(n, np.float32)
    env[:a] = np.linspace(0, 1, a, dtype=np.float32)[:n]
    env[-r:] *= np.linspace(1, 0, r, dtype=np.float32)[-n:]
    return env

def tone(instrument, hz, dur, rng):
    """One note of an instrument, dur seconds long, peak ~1. Square and sawtooth are summed from
    their harmonics below 0.9 x Nyquist, so they do not alias."""
    n = int(dur * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    # Karplus-Strong: a noise burst through a damped, averaging delay loop
    if instrument == "plucked string":
        # averaging y[i-p] and y[i-p+1] delays by p - 1/2 samples
        p = max(2, int(round(SAMPLE_RATE / hz + 0.5)))
        y = np.zeros(n + p + 1)
        # a softer pluck
        burst = np.convolve(rng.uniform(-1, 1, p + 5), [0.25, 0.5, 0.25], "valid")[:p + 1]
        y[:p + 1] = burst - burst.mean()
        i = p + 1
        # y[i] needs y[i-p] and y[i-p+1]: blocks of p-1 samples are independent
        while i < len(y):
            j = min(len(y), i + p - 1)
            y[i:j] = 0.996 * 0.5 * (y[i - p:j - p] + y[i - p + 1:j - p + 1])
            i = j
        y = y[:n]
        y = y / (np.abs(y).max() + 1e-9)
        return (y * envelope(n, 0.002, 0.03)).astype(np.float32)
    if instrument == "bell":                         # FM: inharmonic partials, exponential decay
        y = np.sin(2 * np.pi * hz * t + 2.0 * np.exp(-t * 3) * np.sin(2 * np.pi * hz * 1.4 * t))
        return (y * np.exp(-t * 2.5) * envelope(n, 0.002, 0.05)).astype(np.float32)
    kmax = int((SAMPLE_RATE / 2 * 0.9) // hz)
    if instrument == "sine":
        y = np.sin(2 * np.pi * hz * t)
    elif instrument == "square":
        ks = np.arange(1, kmax + 1, 2)
        y = (np.sin(2 * np.pi * hz * np.outer(ks, t)) / ks[:, None]).sum(0) * 4 / np.pi
    else:  # sawtooth
        ks = np.arange(1, kmax + 1)
        partials = np.sin(2 * np.pi * hz * np.outer(ks, t)) * ((-1.0) ** (ks + 1) / ks)[:, None]
        y = partials.sum(0) * 2 / np.pi
    y = y / (np.abs(y).max() + 1e-9)
    return (y * envelope(n)).astype(np.float32)

def place(buf, x, start):
    """Add x into buf from sample start on, cut at buf's end."""
    end = min(len(buf), start + len(x))
    if end > start:
        buf[start:end] += x[:end - start]

def fmt_list(items):
    """["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

def single_note(rng, max_dur, inst, noun, root):
    """One held note: (wav, notes, labels, caption, story, qa)."""
    dur = float(rng.uniform(1.0, max_dur))
    wav = np.zeros(int(dur * SAMPLE_RATE), np.float32)
    place(wav, tone(inst, midi_hz(root), dur - 0.1, rng), int(0.05 * SAMPLE_RATE))
    name = midi_name(root)
    seconds = f"{dur:.0f} second{'s' if round(dur) != 1 else ''}"
    story = f"A single note, {name}, is played on {noun}, held for about {seconds}."
    qa = [{"q": "what note is played?", "a": name},
          {"q": "how many notes are played?", "a": "one"}]
    return wav, [root], {"pitch": name}, f"{noun} plays the note {name}.", story, qa

def chord(rng, max_dur, inst, noun, root):
    """Three notes at once: (wav, notes, labels, caption, story, qa)."""
    quality = list(CHORDS)[rng.integers(len(CHORDS))]
    notes = [root + i for i in CHORDS[quality]]
    dur = float(rng.uniform(min(1.2, max_dur), max_dur))
    wav = np.zeros(int(dur * SAMPLE_RATE), np.float32)
    for m in notes:
        place(wav, tone(inst, midi_hz(m), dur - 0.1, rng) / len(notes) * 1.5,
              int(0.05 * SAMPLE_RATE))
    name = f"{NOTE_NAMES[root % 12]} {quality}"
    mood = {"major": "bright and happy", "minor": "dark and sad"}.get(quality,
                                                                      "tense and unresolved")
    story = (f"Three notes sound together on {noun}: "
             f"{fmt_list([midi_name(m) for m in notes])}, a {name} chord that sounds {mood}.")
    qa = [{"q": "what chord is played?", "a": name},
          {"q": "is the chord major or minor?", "a": quality},
          {"q": "how many notes sound together?", "a": "three"}]
    return (wav, notes, {"chord": name, "pitch": midi_name(root)}, f"{noun} plays a {name} chord.",
            story, qa)

def note_sequence(rng, max_dur, inst, noun, root, form):
    """An interval or a short melody (arpeggio or scale), one note after another: (wav, notes,
    labels, caption, story, qa)."""
    if form == "interval":
        semis = list(INTERVALS)[rng.integers(len(INTERVALS))]
        up = bool(rng.integers(2))
        notes = [root, root + semis] if up else [root + semis, root]
        shape = f"a {'rising' if up else 'falling'} {INTERVALS[semis]}"
    else:
        pattern = ["arpeggio", "scale"][rng.integers(2)]
        quality = ["major", "minor"][rng.integers(2)]
        scale = [0, 2, 4, 5, 7] if quality == "major" else [0, 2, 3, 5, 7]
        steps = CHORDS[quality] + [12] if pattern == "arpeggio" else scale
        steps = steps[:int(rng.integers(3, len(steps) + 1))]
        up = bool(rng.integers(2))
        notes = [root + s for s in (steps if up else steps[::-1])]
        shape = f"a {'rising' if up else 'falling'} {NOTE_NAMES[root % 12]} {quality} {pattern}"
    note_dur = float(min(rng.uniform(0.25, 0.5), (max_dur - 0.2) / len(notes)))
    wav = np.zeros(int((note_dur * len(notes) + 0.2) * SAMPLE_RATE), np.float32)
    for j, m in enumerate(notes):
        place(wav, tone(inst, midi_hz(m), note_dur * 1.1, rng),
              int((0.05 + j * note_dur) * SAMPLE_RATE))
    direction = "rising" if notes[-1] > notes[0] else "falling"
    story = (f"{noun.capitalize()} plays {NUMBER_WORDS[len(notes)]} notes one after another, "
             f"{fmt_list([midi_name(m) for m in notes])}, {direction} from "
             f"{midi_name(notes[0])} to {midi_name(notes[-1])}.")
    qa = [{"q": "how many notes are played?", "a": NUMBER_WORDS[len(notes)]},
          {"q": "does the melody go up or down?", "a": "up" if direction == "rising" else "down"},
          {"q": "what is the first note?", "a": midi_name(notes[0])}]
    labels = {"pitch": midi_name(notes[0]), "melody": shape[2:]}
    return wav, notes, labels, f"{noun} plays {shape}.", story, qa

def make_music(rng, max_dur):
    """A note, interval, chord or short melody on one instrument. Returns wav + text fields."""
    inst = INSTRUMENTS[rng.integers(len(INSTRUMENTS))]
    noun, adj = INSTRUMENT_TEXT[inst]
    form = ["note", "interval", "chord", "melody"][rng.integers(4)]
    root = int(rng.integers(48, 73))                 # C3 .. C5
    if form == "note":
        wav, notes, labels, caption, story, qa = single_note(rng, max_dur, inst, noun, root)
    elif form == "chord":
        wav, notes, labels, caption, story, qa = chord(rng, max_dur, inst, noun, root)
    else:
        wav, notes, labels, caption, story, qa = note_sequence(rng, max_dur, inst, noun, root,
                                                               form)
    labels = {"class": inst, "instrument": inst, **labels, "form": form}
    qa = [{"q": "what instrument is playing?",
           "a": noun[2:] if noun.startswith("a ") else noun}] + qa
    register = "low" if np.mean(notes) < 55 else "high" if np.mean(notes) > 67 else "middle"
    description = (f"{story} The sound is {adj}. It sits in a {register} register "
                   f"and nothing else can be heard, so it feels like a quiet music lesson.")
    gain = float(rng.uniform(0.3, 0.7))
    wav = wav / (np.abs(wav).max() + 1e-9) * gain
    return wav, dict(kind="music", caption=caption, description=description, labels=labels, qa=qa,
                     transcript=None, notes=notes)

def event_sound(event, rng):
    if event == "beep":
        hz = float(rng.choice([800, 1000, 1200]))
        n = int(0.15 * SAMPLE_RATE)
        x = np.sin(2 * np.pi * hz * np.arange(n) / SAMPLE_RATE)
        return x.astype(np.float32) * envelope(n, 0.005, 0.01)
    if event == "chirp":
        n = int(0.25 * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        f0, f1 = 500.0, 3000.0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1]))
        return np.sin(phase).astype(np.float32) * envelope(n, 0.005, 0.02)
    if event == "noise burst":
        n = int(0.2 * SAMPLE_RATE)
        return (rng.uniform(-1, 1, n) * 0.8).astype(np.float32) * envelope(n, 0.005, 0.03)
    if event == "click":
        n = int(0.01 * SAMPLE_RATE)
        x = np.exp(-np.arange(n) / (0.001 * SAMPLE_RATE)) * np.sign(rng.uniform(-1, 1, n) + 0.5)
        return x.astype(np.float32)
    # siren: a tone wailing up and down twice a second
    n = int(1.0 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    freq = 900 + 400 * np.sin(2 * np.pi * 2.0 * t)
    x = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * 0.7
    return x.astype(np.float32) * envelope(n, 0.02, 0.05)

def make_events(rng, max_dur):
    """A count of one event, or two different events in order. Onsets are recorded (tests check
    them)."""
    ev = EVENTS[rng.integers(len(EVENTS))]
    if rng.random() < 0.6 or ev == "siren":
        count = 1 if ev == "siren" else int(rng.integers(1, 6))
        seq = [ev] * count
    else:
        ev2 = [e for e in EVENTS if e not in (ev, "siren")][rng.integers(3)]
        c1, c2 = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        seq = [ev] * c1 + [ev2] * c2
    gap = 0.12 if len(seq) > 3 else 0.2
    parts = [event_sound(e, rng) for e in seq]
    def length(spacing):  # seconds: the events, the gaps between them and 0.3 s of margin
        return sum(len(p) for p in parts) / SAMPLE_RATE + spacing * (len(parts) - 1) + 0.3
    # even the tightest gaps overflow: drop the last event (every event stays whole in the clip)
    while len(parts) > 1 and length(0.08) > max_dur:
        parts.pop()
        seq.pop()
    gap = max(0.08, gap - max(0.0, length(gap) - max_dur) / max(1, len(seq) - 1))
    dur = length(gap)
    # a lone click still gets a second of room
    dur = min(max_dur, max(dur, float(rng.uniform(1.0, 1.8))))
    # faint background hiss
    wav = (rng.normal(0, 1, int(dur * SAMPLE_RATE)) * 0.002).astype(np.float32)
    t, onsets = 0.1 + float(rng.uniform(0, 0.05)), []
    # events that would run past the clip's end (a siren in a clip of about a second) start
    # earlier, to stay whole
    t = min(t, max(0.0, dur - (length(gap) - 0.3)))
    for p in parts:
        onsets.append(int(t * SAMPLE_RATE))
        place(wav, p * float(rng.uniform(0.5, 0.8)), onsets[-1])
        t += len(p) / SAMPLE_RATE + gap
    groups = []
    for e in seq:
        if groups and groups[-1][0] == e:
            groups[-1][1] += 1
        else:
            groups.append([e, 1])
    said = [f"{NUMBER_WORDS[c]} {EVENT_PLURAL[e] if c > 1 else e}" for e, c in groups]
    labels = {"class": groups[0][0], "event": groups[0][0], "count": str(groups[0][1])}
    if len(groups) == 1:
        e, c = groups[0]
        caption = f"{said[0]}." if e != "siren" else "a siren wails up and down."
        qa = [{"q": f"how many {EVENT_PLURAL[e]} are there?", "a": NUMBER_WORDS[c]},
              {"q": "what sound is this?", "a": e}]
        again = (f", then it repeats until there are {NUMBER_WORDS[c]} of them, evenly spaced."
                 if c > 1 else " just once.")
        story = f"In a quiet room, {EVENT_TEXT[e]} is heard" + again
    else:
        labels["order"] = " then ".join(e for e, _ in groups)
        labels["count_2"] = str(groups[1][1])
        caption = f"{said[0]} followed by {said[1]}."
        qa = [{"q": "which sound comes first?", "a": groups[0][0]},
              {"q": "which sound comes last?", "a": groups[1][0]},
              {"q": f"how many {EVENT_PLURAL[groups[1][0]]} are there?",
               "a": NUMBER_WORDS[groups[1][1]]}]
        (first, n1), (second, n2) = groups
        story = (f"First comes {EVENT_TEXT[first]}"
                 + (f", {NUMBER_WORDS[n1]} times" if n1 > 1 else "")
                 + f". After a short pause it changes to {EVENT_TEXT[second]}"
                 + (f", heard {NUMBER_WORDS[n2]} times" if n2 > 1 else "") + ".")
    description = (f"{story} Between the sounds there is only a faint hiss, like an empty room "
                   f"with a machine signalling.")
    return wav, dict(kind="events", caption=caption, description=description, labels=labels, qa=qa,
                     transcript=None, onsets=onsets, sequence=seq)

def morse_envelope(word, unit):
    """On/off sample mask for a word: dot 1 unit, dash 3, gap 1 inside a letter, 3 between
    letters."""
    on = []
    for li, ch in enumerate(word):
        if li:
            on += [0] * 3
        for si, sym in enumerate(MORSE[ch]):
            if si:
                on += [0]
            on += [1] * (1 if sym == "." else 3)
    return np.repeat(np.array(on, np.float32), int(unit * SAMPLE_RATE))

def make_morse(rng, max_dur):
    unit = float(rng.uniform(0.045, 0.07))
    fits = [w for w in WORDS
            if len(morse_envelope(w, unit)) / SAMPLE_RATE + 0.3 <= max_dur] or ["e"]
    word = fits[rng.integers(len(fits))]
    hz = float(rng.choice([500, 600, 700, 800]))
    env = morse_envelope(word, unit)
    lead = int(0.15 * SAMPLE_RATE)
    wav = np.zeros(len(env) + 2 * lead, np.float32)
    window = np.hanning(int(0.004 * SAMPLE_RATE))
    smooth = np.convolve(env, window / window.sum(), "same")
    carrier = np.sin(2 * np.pi * hz * np.arange(len(env)) / SAMPLE_RATE)
    wav[lead:lead + len(env)] = carrier * smooth * float(rng.uniform(0.4, 0.7))
    wpm = round(1.2 / unit)                          # PARIS timing: a unit of 1.2 / wpm seconds
    caption = f"morse code spelling the word {word}."
    description = (f"A steady {int(hz)} hertz tone taps out morse code at about {wpm} words per "
                   f"minute. The dots and dashes spell {fmt_list(list(word))}, the word {word}, "
                   f"like a radio operator signalling.")
    qa = [{"q": "what word is spelled in morse code?", "a": word},
          {"q": "how many letters are sent?",
           "a": NUMBER_WORDS[len(word)] if len(word) <= 10 else str(len(word))},
          {"q": "what is the first letter?", "a": word[0]}]
    return wav, dict(kind="morse", caption=caption, description=description, transcript=word,
                     labels={"class": "morse code", "word": word}, qa=qa, unit=unit)

def make_dtmf(rng, max_dur):
    tone_dur, gap = float(rng.uniform(0.08, 0.12)), float(rng.uniform(0.06, 0.1))
    most = max(1, int((max_dur - 0.3) // (tone_dur + gap)))
    k = int(rng.integers(min(3, most), min(7, most) + 1))
    digits = "".join(DTMF_KEYS[i] for i in rng.integers(len(DTMF_KEYS), size=k))
    n = int((0.3 + k * (tone_dur + gap)) * SAMPLE_RATE)
    wav = np.zeros(n, np.float32)
    nt = int(tone_dur * SAMPLE_RATE)
    t = np.arange(nt) / SAMPLE_RATE
    amp = float(rng.uniform(0.25, 0.4))
    for j, d in enumerate(digits):
        x = np.sin(2 * np.pi * DTMF_LOW[d] * t) + np.sin(2 * np.pi * DTMF_HIGH[d] * t)
        x = x * amp * envelope(nt, 0.003, 0.003)
        place(wav, x.astype(np.float32), int((0.15 + j * (tone_dur + gap)) * SAMPLE_RATE))
    spoken = " ".join(DTMF_WORDS[d] for d in digits)
    caption = f"telephone keypad tones dialing {spoken}."
    description = (f"Someone dials a phone: {NUMBER_WORDS[k]} keypad tones, each a chord of two "
                   f"pitches. The keys pressed are {spoken}, in a quick, even rhythm.")
    qa = [{"q": "what number is dialed?", "a": spoken},
          {"q": "how many keys are pressed?", "a": NUMBER_WORDS[k]}]
    return wav, dict(kind="dtmf", caption=caption, description=description, transcript=spoken,
                     labels={"class": "dtmf tones", "digits": digits}, qa=qa)

def make_mixture(rng, max_dur):
    """Music with events over it. Its text is cut from the two clips' own: it relies on their
    sentence shapes, "<noun> plays <what>." and "<event> followed by <event>." in the captions,
    "<story> The sound is ..." and "<story> Between the sounds ..." in the descriptions."""
    music, m = make_music(rng, max_dur)
    ev, e = make_events(rng, max_dur)
    n = max(len(music), len(ev))
    wav = np.zeros(n, np.float32)
    place(wav, music * 0.6, 0)
    place(wav, ev, 0)
    inst = m["labels"]["instrument"]
    ev_name = e["labels"]["event"]
    count = int(e["labels"]["count"])
    noun = INSTRUMENT_TEXT[inst][0]
    ev_said = f"{NUMBER_WORDS[count]} {EVENT_PLURAL[ev_name] if count > 1 else ev_name}"
    if "order" in e["labels"]:
        ev_said += f" and then {e['caption'].split(' followed by ')[1].rstrip('.')}"
    caption = f"{ev_said} over {noun} playing {m['caption'].split(' plays ')[1].rstrip('.')}."
    labels = {"class": ev_name, "event": ev_name, "count": e["labels"]["count"], "instrument": inst}
    for key in ("pitch", "chord", "melody", "order"):
        if key in m["labels"]:
            labels[key] = m["labels"][key]
        if key in e["labels"]:
            labels[key] = e["labels"][key]
    qa = [{"q": "what instrument plays in the background?", "a": noun[2:]},
          {"q": f"how many {EVENT_PLURAL[ev_name]} are heard over the music?",
           "a": NUMBER_WORDS[count]},
          {"q": "what sound interrupts the music?", "a": ev_name}]
    # the music's question after its instrument one: the note, the chord or how many notes
    qa += m["qa"][1:2]
    events_story = e["description"].split(" Between the sounds")[0]
    description = (f"Music and other sounds overlap. {m['description'].split(' The sound is ')[0]} "
                   f"Over the music, {events_story[0].lower()}{events_story[1:]} The two do not "
                   f"belong together, as if an alarm went off during a music lesson.")
    return wav, dict(kind="mixture", caption=caption, description=description, labels=labels, qa=qa,
                     transcript=None, onsets=e["onsets"], sequence=e["sequence"], notes=m["notes"])

# --- speech: libespeak-ng and its voice data ship in the espeakng-loader pip package (no system
# package); we drive the C library through ctypes

ESPEAK_SR = 22050                                    # what libespeak-ng synthesises at

class SpeechUnavailable(RuntimeError):
    """libespeak-ng cannot be loaded or used; the message names the cause."""

def espeak_open():
    """A freshly loaded, initialised libespeak-ng. Fresh for every sentence on purpose: the library
    keeps state between utterances (its pitch-flutter phase, filter memories), so a shared instance
    would make a clip's audio depend on the clips spoken before it. Loading it costs about a
    millisecond."""
    try:
        import espeakng_loader
        lib_path, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except (ImportError, RuntimeError) as e:
        raise SpeechUnavailable(f"espeakng-loader: {e} (pip install espeakng-loader)") from None
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as e:
        raise SpeechUnavailable(f"cannot load libespeak-ng: {e}") from None
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    # espeak-ng >= 1.52: without it, breathy voices vary
    if not hasattr(lib, "espeak_ng_SetRandSeed"):
        raise SpeechUnavailable(f"{lib_path}: too old, no espeak_ng_SetRandSeed (pip install -U "
                                f"espeakng-loader)")
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    # 2: AUDIO_OUTPUT_SYNCHRONOUS, samples go to a callback
    sr = lib.espeak_Initialize(2, 0, data_path.encode(), 0)
    if sr != ESPEAK_SR:
        espeak_close(lib)
        raise SpeechUnavailable(f"espeak_Initialize failed with the voice data in {data_path} "
                                f"(returned {sr})")
    return lib

def espeak_close(lib):
    import _ctypes
    lib.espeak_Terminate()
    # unload: the next open starts clean
    (_ctypes.FreeLibrary if os.name == "nt" else _ctypes.dlclose)(lib._handle)

def speech_problem():
    """None if speech can be synthesised here, else the cause in one line."""
    try:
        espeak_close(espeak_open())
    except SpeechUnavailable as e:
        return str(e)

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.c_void_p)

def speak(text, voice, rate=175, pitch=50):
    """text spoken by an espeak-ng voice ("en-us+Andy": language + variant) at rate words/min and
    pitch 0-99, as float32 at 24 kHz."""
    chunks, caught = [], []

    @_SynthCallback
    def collect(wav, n, events):                     # int16 samples, a block at a time
        if caught:
            return 1                                 # 1: abort synthesis
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0                                     # 0: go on

    # ctypes reports an exception raised in the callback (a Ctrl-C lands there most of the time)
    # to sys.unraisablehook and drops it: the clip would be cut short and the run go on. It is
    # kept instead, espeak stopped, and the exception raised below
    report = sys.unraisablehook

    def keep(unraisable):
        if "ctypes callback" in (unraisable.err_msg or ""):
            caught.append(unraisable.exc_value)
        else:
            report(unraisable)
    lib, sys.unraisablehook = espeak_open(), keep
    try:
        lib.espeak_SetSynthCallback(collect)
        # seeded, so a sentence sounds the same in every process: some voices' noise comes from
        # libc's rand(), which other libraries in this process may have drawn from, and the
        # breathy ones' (f2, f3, f5, Alicia) from espeak's own generator, clock-seeded by default
        ctypes.CDLL(None).srand(0)
        lib.espeak_ng_SetRandSeed(0)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SpeechUnavailable(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(1, int(rate), 0)     # espeakRATE
        lib.espeak_SetParameter(3, int(pitch), 0)    # espeakPITCH
        b = text.encode()
        # from character 0 (POS_CHARACTER), plain text
        lib.espeak_Synth(b, len(b) + 1, 0, 1, 0, 0, None, None)
        lib.espeak_Synchronize()
    finally:
        sys.unraisablehook = report
        espeak_close(lib)
    if caught:
        raise caught[0]
    wav = np.concatenate(chunks).astype(np.float32) / 32768 if chunks else np.zeros(0, np.float32)
    # audio.py imports torch; the rest of this file is numpy only
    from audio import resample
    return resample(wav, ESPEAK_SR)

def phonemes(texts, voice):
    """The phonemes an espeak-ng voice speaks for each text, as lists of espeak's phoneme mnemonics
    ("D", "@", "aI", ...; stress marks left out) with " " between words: the sounds of
    speak(text, voice), which a speech recogniser can learn to hear from the audio alone."""
    lib = espeak_open()
    try:
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                              ctypes.c_int]
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SpeechUnavailable(f"espeak-ng has no voice {voice!r}")
        out = []
        for text in texts:
            words, rest = [], ctypes.c_char_p(text.encode())
            while rest.value:  # a clause per call; rest moves on past it
                # text mode 0 (plain), phoneme mode "_" << 8: the mnemonics, "_" between phonemes
                clause = lib.espeak_TextToPhonemes(ctypes.byref(rest), 0, ord("_") << 8)
                for word in clause.decode().split():
                    word = [p for p in word.replace("'", "").replace(",", "").split("_") if p]
                    if word:
                        words.append(word)
            out.append([p for i, word in enumerate(words) for p in ([" "] if i else []) + word])
        return out
    finally:
        espeak_close(lib)

# Speakers, (voice, sex, rate, pitch): a voice (espeak-ng language + variant, whose files are in
# espeakng-loader's data) of a fixed sex, from its variant, at a fixed rate (words/min) and pitch
# (0-99).
SPEAKERS = {
    "andy": ("en-us+Andy", "male", 160, 45), "storm": ("en-us+Storm", "male", 145, 45),
    "lee": ("en-us+Lee", "male", 175, 55), "m1": ("en-gb-x-rp+m1", "male", 170, 40),
    "m3": ("en+m3", "male", 185, 50), "m6": ("en-029+m6", "male", 165, 50),
    "m7": ("en-us+m7", "male", 195, 45),
    "f2": ("en-us+f2", "female", 160, 55), "f3": ("en+f3", "female", 175, 60),
    "f4": ("en-gb-x-rp+f4", "female", 165, 50), "annie": ("en-us+Annie", "female", 185, 50),
    "alicia": ("en-us+Alicia", "female", 150, 45), "belinda": ("en+belinda", "female", 170, 50),
    "steph": ("en-us+steph", "female", 190, 55),
}

# The sentence grammar: commands, counts, colours, objects, places, people, days, directions, phone
# numbers. A few hundred words in many combinations, so a model has to hear the words to transcribe
# or answer.
COLOURS = "red blue green yellow black white orange purple pink brown grey gold silver".split()
OBJECTS = ("box cup ball book chair table lamp key phone pen bag hat shoe coat bottle plate spoon "
           "fork clock window door bike car bus boat kite drum bell card letter map ring sock "
           "shirt cake apple egg basket bucket blanket pillow candle mirror brush ladder rope "
           "hammer umbrella wallet ticket camera radio glass bowl jar towel helmet glove sweater "
           "button pencil guitar violin tent bench fence flower tray shovel kettle").split()
PLACES_IN = ("kitchen garden office bedroom bathroom hall garage basement attic classroom library "
             "museum shop bakery hotel restaurant cinema theatre church hospital village city "
             "forest park playground studio").split()
PLACES_AT = ("station airport beach bank harbour farm market stadium bridge tower corner gate "
             "school").split()
PEOPLE = ("anna ben clara david emma frank grace henry isabel jack kate leo maria nick olivia "
          "peter rosa sam tom lucy paul sarah james laura mark").split() + [
          "the doctor", "the teacher", "the driver", "the baker", "the captain", "the farmer",
          "the nurse", "my mother", "my father", "my sister", "my brother", "our neighbour"]
VERBS = ("bring find open close move clean paint wash hide take drop carry push pull check fix "
         "sell buy").split() + [
         "pick up", "give me", "show me", "look at", "put down"]
ACTIVITIES = ("waiting sleeping reading cooking working singing dancing playing studying painting "
              "eating resting").split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
DIRECTIONS = "left right forward back".split()
TEENS = "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()

def number_words(n):
    """0..99 in words: 42 -> "forty two"."""
    if n <= 10:
        return NUMBER_WORDS[n]
    if n < 20:
        return TEENS[n - 11]
    return TENS[n // 10 - 2] + ("" if n % 10 == 0 else " " + NUMBER_WORDS[n % 10])

def plural(noun):
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")

# (form, pattern): the slots in braces are drawn independently; each slot named in a sentence
# (except verb and activity) gets a question
TEMPLATES = [
    ("command", "{verb} the {colour} {object}"), ("command", "put the {colour} {object} {at}"),
    ("command", "{verb} {number} {colour} {objects}"),
    ("command", "move the {object} {steps} steps {direction}"),
    ("command", "call {digits}"), ("command", "meet {person} at {hour} o'clock on {day}"),
    ("statement", "{person} is {activity} {at}"), ("statement", "{person} has {number} {objects}"),
    ("statement", "the {object} {at} is {colour}"),
    ("statement", "there are {number} {objects} {at}"),
    ("question", "where is the {colour} {object}"), ("question", "who is {activity} {at}"),
]
SHORT_TEMPLATES = [("statement", "{colour} {object}"), ("command", "turn {direction}"),
                   ("statement", "{number}")]
# pattern slot -> what it names
SAYS = {"objects": "object", "at": "place", "steps": "number", "hour": "number", "digits": "number"}
SLOT_TEXT = {  # what a mentioned slot gives: its question, and its words in the description
    "colour": ("what colour is mentioned?", "the colour {}"),
    "object": ("what object is mentioned?", "the {}"),
    "place": ("what place is mentioned?", "the {}"), "person": ("who is mentioned?", "{}"),
    "number": ("what number is said?", "the number {}"), "day": ("what day is mentioned?", "{}"),
    "direction": ("which direction is said?", "the direction {}"),
}

def sentence(rng, short=False):
    """A sentence of the grammar: (text, form, {slot: value} for what it mentions). short: two words
    at most."""
    pick = lambda xs: xs[rng.integers(len(xs))]
    form, pattern = pick(SHORT_TEMPLATES if short else TEMPLATES)
    v = dict(colour=pick(COLOURS), object=pick(OBJECTS), verb=pick(VERBS), person=pick(PEOPLE),
             activity=pick(ACTIVITIES),
             place=pick(PLACES_IN + PLACES_AT), day=pick(DAYS), direction=pick(DIRECTIONS),
             number=number_words(int(rng.integers(2, 21) if rng.random() < 0.7
                                     else rng.integers(21, 100))),
             steps=number_words(int(rng.integers(2, 11))),
             hour=number_words(int(rng.integers(1, 13))),
             digits=" ".join(NUMBER_WORDS[d]
                             for d in rng.integers(0, 10, size=int(rng.integers(3, 7)))))
    v["objects"] = plural(v["object"])
    v["at"] = f"{'in' if v['place'] in PLACES_IN else 'at'} the {v['place']}"
    base = dict(v, objects=v["object"], at=v["place"])  # what a derived slot names
    mentioned = {SAYS.get(s, s): base[s]
                 for s in re.findall(r"{(\w+)}", pattern) if s not in ("verb", "activity")}
    return pattern.format(**v), form, mentioned

def make_speech(rng, max_dur):
    """A sentence of the grammar spoken by one of the SPEAKERS, with silence around it."""
    name = list(SPEAKERS)[rng.integers(len(SPEAKERS))]
    voice, sex, rate, pitch = SPEAKERS[name]
    lead, tail = float(rng.uniform(0.05, 0.25)), float(rng.uniform(0.1, 0.25))
    gain = float(rng.uniform(0.3, 0.7))
    best = None
    # redraw until it fits (~5 ms a sentence), the last 4 tries with two words at most; else the
    # shortest drawn
    for attempt in range(12):
        text, form, mentioned = sentence(rng, short=attempt >= 8)
        # "?": a question's intonation
        speech = speak(text + ("?" if form == "question" else "."), voice, rate, pitch)
        if best is None or len(speech) < len(best[0]):
            best = (speech, text, form, mentioned)
        if len(speech) / SAMPLE_RATE + lead + tail <= max_dur:
            break
    speech, text, form, mentioned = best
    # too long for its silences (a max_dur near a second): they shrink, the words stay whole
    room = max_dur - len(speech) / SAMPLE_RATE
    if lead + tail > room:
        shrink = max(0.0, room) / (lead + tail)
        lead, tail = lead * shrink, tail * shrink
    wav = np.zeros(int((lead + tail) * SAMPLE_RATE) + len(speech), np.float32)
    place(wav, speech / (np.abs(speech).max() + 1e-9) * gain, int(lead * SAMPLE_RATE))
    # cuts only when max_dur is shorter than the shortest sentence spoken
    wav = wav[:int(max_dur * SAMPLE_RATE)]
    who = "a man" if sex == "male" else "a woman"
    says = "asks" if form == "question" else "says"
    caption = f"{who} {says}: {text}{'?' if form == 'question' else '.'}"
    speed = "slowly" if rate < 155 else "quickly" if rate >= 185 else "at an even pace"
    description = (f"{who.capitalize()}'s synthetic voice {says} one short {form} {speed}, with no "
                   f"other sound: \"{text}\". It mentions "
                   f"{fmt_list([SLOT_TEXT[s][1].format(x) for s, x in mentioned.items()])}.")
    qa = [{"q": "what does the speaker say?", "a": text},
          {"q": "is the speaker a man or a woman?", "a": who},
          {"q": "is it a command, a question or a statement?", "a": form}]
    qa += [{"q": SLOT_TEXT[s][0], "a": x} for s, x in mentioned.items()]
    return wav, dict(kind="speech", caption=caption, description=description, transcript=text,
                     qa=qa, labels={"class": "speech", "speaker": name, "gender": sex},
                     voice=voice, mentioned=mentioned)

# (kind, share of the corpus, its maker)
KIND_MIX = [("music", 0.24, make_music), ("events", 0.18, make_events),
            ("morse", 0.105, make_morse), ("dtmf", 0.105, make_dtmf),
            ("mixture", 0.12, make_mixture), ("speech", 0.25, make_speech)]

def synth_clip(seed, i, max_dur, speech=True, kinds=None):
    """Clip i of the built-in corpus. It depends only on (seed, i), so a bigger --clips keeps the
    smaller corpus. kinds (names in KIND_MIX) keeps only those kinds, and speech=False (no
    libespeak-ng) leaves speech out; the kinds left keep their proportions to each other."""
    rng = np.random.default_rng([seed, i])
    mix = [m for m in KIND_MIX if (speech or m[0] != "speech") and (not kinds or m[0] in kinds)]
    if not mix:
        raise ValueError(f"synth_clip: no kind left to draw from (kinds={kinds}, speech={speech})")
    r, acc = rng.random() * sum(p for _, p, _ in mix), 0.0
    for kind, p, fn in mix:
        acc += p
        if r < acc:
            break
    wav, info = fn(rng, max_dur)
    wav = np.clip(wav, -1, 1).astype(np.float32)
    short = int(min(1.0, max_dur) * SAMPLE_RATE) - len(wav)
    # at least a second (a short Morse word): pad with silence
    if short > 0:
        wav = np.concatenate([wav, np.zeros(short, np.float32)])
    info["id"] = f"synth-{i:06d}"
    info["source"] = f"synth:{kind}"
    return wav, info
