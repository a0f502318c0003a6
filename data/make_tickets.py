"""Generate the support-ticket triage dataset of finetune_lab, reproducibly (seeded).

    python data/make_tickets.py            # writes the three files below, next to this script
    python data/make_tickets.py --check    # regenerates in memory and fails if the files differ

Writes
- tickets_raw.jsonl      chat-format rows (system, user ticket, assistant JSON answer) with planted defects
- tickets_prefs.jsonl    preference pairs (prompt, chosen, rejected) built from the clean rows
- tickets_manifest.json  how many defects of each kind were planted, and on which lines

How a ticket is made: one *phrasing* of one *intent* (data/ticket_bank.py, written by hand; ~6 intents per
category, 10+ phrasings each) is filled with a product, order id, amount, date; optional greeting, details,
a tone line (angry / polite / positive / urgent), a closing; sometimes typos, all lower case, a second issue,
or contact details (PII). The labels follow from those choices by fixed rules (below), so a model can learn them.
Each clean ticket must differ from every other one (character 5-gram Jaccard < 0.35, checked), so that the only
near-duplicates and related rows in the file are the planted ones. The 40 hand-written hard cases of the bank
are added as they are. Every row carries `meta.phrasing` (its phrasing family), which the split uses to hold
out whole phrasings for validation and test.
"""
import json, random, re, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ticket_bank as B  # noqa: E402
from finetune_lab.data import SYSTEM_PROMPT, PRIORITIES, shingles, find_pii  # noqa: E402

SEED = 42
N_CLEAN = 2000          # generated clean tickets (plus the hand-written hard cases)
PLANT = dict(exact_duplicates=40, near_duplicates=60, empty_output=25, invalid_output=35,
             label_conflict_pairs=15, too_short=12, too_long=10, leakage=30)
MAX_CLEAN_JACCARD = 0.35   # clean tickets are at most this similar to each other
NEAR_MIN = 0.92            # planted near duplicates are at least this similar to their original
FOLLOWUP_RANGE = (0.58, 0.74)  # planted follow-ups: related (> leak threshold 0.5), not near copies (< 0.8)
# a realistic, moderate imbalance: "other" is the rarest queue, billing/shipping/technical the busiest
CATEGORY_SHARES = dict(billing=0.19, shipping=0.19, technical=0.19, account=0.15, refund=0.16, other=0.12)
MONTHS = "January February March April May June July August September October November December".split()
AMOUNTS = ["$9.99", "$14.99", "$19.99", "$24.50", "$49.99", "$59.00", "$89.00", "$129.99", "$249.00", "$399.99"]


def jaccard(a, b):
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


class Maker:
    def __init__(self, seed):
        from datasketch import MinHash, MinHashLSH
        self.rng = random.Random(seed)
        self.MinHash = MinHash
        # candidates generously (recall matters: a missed similar pair would be an unplanted "related" row)
        self.lsh = MinHashLSH(threshold=0.2, num_perm=128, weights=(0.05, 0.95))
        self.texts = {}

    def distinct(self, text):
        "True (and remembered) when `text` is less than MAX_CLEAN_JACCARD similar to every accepted text."
        m = self.MinHash(num_perm=128, seed=7)
        m.update_batch([s.encode() for s in shingles(text)])
        if any(jaccard(text, self.texts[k]) >= MAX_CLEAN_JACCARD for k in self.lsh.query(m)): return False
        key = str(len(self.texts)); self.lsh.insert(key, m); self.texts[key] = text
        return True

    # --- slots and labels -------------------------------------------------------------------------
    def slots(self, intent):
        r = self.rng
        kinds = intent["product_kinds"]
        products = [p["name"] for p in B.PRODUCTS if p["kind"] in kinds]
        return dict(product=r.choice(products) if products else "none", order=f"NW-{r.randint(10000, 99999)}",
                    amount=r.choice(AMOUNTS), date=f"{r.choice(MONTHS)} {r.randint(1, 28)}", days=r.randint(2, 21),
                    years=r.randint(2, 9), name=r.choice(B.NAMES))

    def pii(self):
        r = self.rng
        kind = r.choices(["email", "phone", "card"], [6, 3, 1])[0]
        if kind == "email":
            user = r.choice(B.NAMES).lower() + r.choice(["", ".", "_"]) + r.choice(["smith", "k", "w", str(r.randint(1, 99)), "lee", "m"])
            return kind, r.choice(["My email is {}.", "You can reach me at {}.", "Please reply to {} instead.", "(email: {})"]).format(
                f"{user}@{r.choice(['example.com', 'mail.example.org', 'example.net'])}")
        if kind == "phone":
            num = r.choice([f"+1 {r.randint(201, 989)}-555-{r.randint(100, 199):04d}", f"({r.randint(201, 989)}) 555-{r.randint(100, 199):04d}",
                            f"+44 20 7946 {r.randint(0, 999):04d}", f"+49 30 {r.randint(100, 999)} {r.randint(1000, 9999)}"])
            return kind, r.choice(["Call me on {}.", "My number is {}.", "Phone: {}", "You can text {} if that is easier."]).format(num)
        digits = [4] + [r.randint(0, 9) for _ in range(14)]
        check = next(c for c in range(10) if _luhn(digits + [c]))
        card = "".join(map(str, digits + [check]))
        card = " ".join(card[i:i + 4] for i in range(0, 16, 4))
        return kind, r.choice(["I paid with card {}.", "The card was {} if you need it.", "Charged on {}."]).format(card)

    # --- one ticket ---------------------------------------------------------------------------------
    def ticket(self, category=None):
        r = self.rng
        category = category or r.choice(B.CATEGORIES)
        intent = r.choice(B.INTENTS[category])
        k = r.randrange(len(intent["phrasings"]))
        s = self.slots(intent)
        style = r.choices(["plain", "polite", "angry", "terse", "rambling", "positive"], [30, 20, 18, 12, 10, 10])[0]
        if intent["key"] == "compliment": style = r.choice(["positive", "plain", "polite"])  # praise is never angry
        parts = []
        if style != "terse" and r.random() < 0.7: parts.append(r.choice(B.GREETINGS).format(**s))
        parts.append(intent["phrasings"][k].format(**s))
        n_details = {"terse": 0, "rambling": 3}.get(style, r.choice([0, 1, 1, 2]))
        parts += [d.format(**s) for d in r.sample(intent["details"], min(n_details, len(intent["details"])))]
        second = None
        if r.random() < 0.08:  # a second, separate issue
            cat2 = r.choice([c for c in B.CATEGORIES if c != category])
            it2 = r.choice(B.INTENTS[cat2])
            s2 = {**self.slots(it2), "name": s["name"]}
            parts.append(r.choice(["Also, ", "Separately, ", "One more thing: ", "Unrelated, but "]) + _lower_first(r.choice(it2["phrasings"]).format(**s2)))
            second = cat2
        tone = {"angry": B.ANGRY_LINES, "polite": B.POLITE_LINES, "positive": B.POSITIVE_LINES}.get(style)
        if tone: parts.append(r.choice(tone).format(**s))
        urgent = r.random() < 0.18
        if urgent: parts.append(r.choice(B.URGENT_LINES).format(**s))
        pii = None
        if r.random() < 0.08:
            pii, line = self.pii(); parts.append(line)
        if style != "terse" and r.random() < 0.6: parts.append(r.choice(B.CLOSINGS).format(**s))
        text = (r.choice([" ", " ", "\n", "\n\n"])).join(parts)
        if r.random() < 0.12 and not pii: text = text.lower()
        if r.random() < 0.15: text = self.typos(text, r.randint(1, 2))
        # labels, by fixed rules
        level = PRIORITIES.index(intent["base_priority"])
        if urgent: level = max(level + 1, 2)
        elif style == "angry": level += 1
        elif style == "polite": level -= 1
        priority = PRIORITIES[min(max(level, 0), 3)]
        sentiment = {"angry": "negative", "positive": "positive"}.get(style, "negative" if urgent else "neutral")
        if intent["key"] == "compliment": sentiment = "positive"
        summary = r.choice(intent["summaries"]).format(**s)
        if second: summary = summary.rstrip(".") + f", and also raises a separate {second} issue."
        answer = dict(category=category, priority=priority, product=s["product"], sentiment=sentiment, summary=summary)
        return dict(text=text, answer=answer, phrasing=f"{category}/{intent['key']}/{k}", pii=pii)

    def typos(self, text, n):
        words = [i for i, w in enumerate(text.split(" ")) if len(w) > 4 and w.isalpha()]
        ws = text.split(" ")
        for i in self.rng.sample(words, min(n, len(words))):
            w = ws[i]; j = self.rng.randrange(1, len(w) - 2)
            ws[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        return " ".join(ws)

    def clean(self, category=None):
        while True:
            t = self.ticket(category)
            if not t["pii"] and find_pii(t["text"]): continue  # never an accidental PII look-alike
            if self.distinct(t["text"]): return t


def _lower_first(s): return s[:1].lower() + s[1:]


def _luhn(digits):
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def row(text, answer, phrasing, raw_answer=None):
    content = raw_answer if raw_answer is not None else json.dumps(answer, ensure_ascii=False)
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                         {"role": "assistant", "content": content}], "meta": {"phrasing": phrasing}}


def near_variant(rng, text):
    "The same ticket with a typo, doubled spaces, other casing or punctuation (at least NEAR_MIN similar)."
    for _ in range(50):
        op = rng.choice(["typo", "spaces", "case", "punct", "typo+case"])
        v = text
        if "typo" in op:
            ws = v.split(" "); idx = [i for i, w in enumerate(ws) if len(w) > 4 and w.isalpha()]
            if idx:
                i = rng.choice(idx); w = ws[i]; j = rng.randrange(1, len(w) - 2); ws[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            v = " ".join(ws)
        if op == "spaces": v = re.sub(r" ", lambda m: "  " if rng.random() < 0.3 else " ", v) + "  "
        if "case" in op: v = v.upper() if rng.random() < 0.2 else v.lower() if v != v.lower() else v.capitalize()
        if op == "punct": v = re.sub(r"[.!?](?=\s|$)", lambda m: rng.choice(["", "!!", ".", "?"]), v)
        if v.strip() != text.strip() and jaccard(v, text) >= NEAR_MIN: return v
    raise RuntimeError("no near variant found")


FOLLOWUPS = [
    "UPDATE: it is now {date} and I still have not heard back from anyone.",
    "Following up on my message below, nothing has changed since I wrote.",
    "Adding to this: I tried again this morning and got exactly the same result.",
    "Second time writing about this. Please see my original message.",
    "Any news? I sent this {days} days ago and the ticket still shows as open.",
    "Forwarding my earlier note because the chat agent told me to email instead.",
    "Just bumping this. My partner is asking me about it every day now.",
    "P.S. I checked my spam folder too, there is no reply from you there either.",
    "Edit: one more detail, this started right after the last update.",
    "I am copying my first message again so you have everything in one place.",
]
SHORT = ["help", "hi", "refund", "help!!", "hello?", "???", "broken", "urgent", "hey", "cancel", "pls help", "order?"]
LOG = ["[sync] ERROR connection reset by peer, retrying", "[sync] WARN token expired, refreshing session",
       "[ui] INFO opened settings panel", "[net] ERROR handshake failed: certificate not trusted", "[db] WARN slow query on cache table",
       "[ble] INFO scanning for devices", "[ble] ERROR pairing rejected by remote device", "[app] INFO resumed from background"]
BAD_JSON = [lambda a: json.dumps(a)[: len(json.dumps(a)) * 3 // 5],                         # cut off mid-object
            lambda a: str(a),                                                                # a Python dict, single quotes
            lambda a: "Sure! Here is the triage:\n" + json.dumps(a),                         # prose around the JSON
            lambda a: "```json\n" + json.dumps(a, indent=2) + "\n```",                       # a Markdown fence
            lambda a: json.dumps(a)[:-1] + ',}']                                             # trailing comma
BAD_SCHEMA = [lambda a: {k: v for k, v in a.items() if k != "summary"},                      # missing key
              lambda a: {**a, "category": "complaint"},                                       # not in the enum
              lambda a: {**a, "priority": "critical"},
              lambda a: {**a, "confidence": 0.9},                                             # extra key
              lambda a: {**a, "sentiment": "angry"},
              lambda a: {**a, "product": ""},                                                 # empty product
              lambda a: {**a, "summary": "ok"}]                                               # too short


def build(seed=SEED):
    mk = Maker(seed)
    rng = random.Random(seed + 1)
    clean = []
    cats = [c for c, share in CATEGORY_SHARES.items() for _ in range(round(share * N_CLEAN))]
    for c in cats: clean.append(mk.clean(c))
    for j, h in enumerate(B.HARD_CASES):
        assert mk.distinct(h["ticket"]), f"hard case {j} is too similar to a generated ticket"
        clean.append(dict(text=h["ticket"], answer={k: h[k] for k in ("category", "priority", "product", "sentiment", "summary")},
                          phrasing=f"hand/{j}", pii=None))
    rows = [(row(t["text"], t["answer"], t["phrasing"]), "clean", t, i) for i, t in enumerate(clean)]
    # set-level defects, each made from its own clean rows (`base`: the index of that clean row)
    pool = list(range(N_CLEAN)); rng.shuffle(pool)
    take = lambda n: [pool.pop() for _ in range(n)]
    for i in take(PLANT["exact_duplicates"]):
        t = clean[i]
        rows.append((row(t["text"] + rng.choice(["", " ", "\n"]), t["answer"], t["phrasing"]), "exact_duplicates", t, i))
    for i in take(PLANT["near_duplicates"]):
        t = clean[i]
        rows.append((row(near_variant(rng, t["text"]), t["answer"], t["phrasing"]), "near_duplicates", t, i))
    for i in take(PLANT["label_conflict_pairs"]):
        t = clean[i]
        other = rng.choice([c for c in B.CATEGORIES if c != t["answer"]["category"]])
        rows.append((row(t["text"], {**t["answer"], "category": other}, t["phrasing"]), "label_conflicts", t, i))
    made = 0
    while made < PLANT["leakage"]:
        i = pool.pop(); t = clean[i]
        for _ in range(40):
            extra = " ".join(rng.sample(FOLLOWUPS, rng.randint(1, 4))).format(date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", days=rng.randint(3, 14))
            follow = rng.choice(["{extra}\n\n> {text}", "{text}\n\n{extra}", "{extra}\n\n---\n{text}"]).format(extra=extra, text=t["text"])
            if FOLLOWUP_RANGE[0] <= jaccard(follow, t["text"]) <= FOLLOWUP_RANGE[1]: break
        else: continue  # this ticket's length doesn't suit a follow-up: it stays a plain clean row
        made += 1
        ans = {**t["answer"], "priority": PRIORITIES[min(PRIORITIES.index(t["answer"]["priority"]) + 1, 3)]}
        rows.append((row(follow, ans, t["phrasing"]), "leakage", t, i))
    # row-level defects, on fresh distinct tickets
    for n in range(PLANT["empty_output"]):
        t = mk.clean(); rows.append((row(t["text"], None, t["phrasing"], raw_answer=rng.choice(["", " ", "\n", "  \n\t"])), "empty_output", t, None))
    for n in range(PLANT["invalid_output"]):
        t = mk.clean()
        raw = BAD_JSON[n % 5](t["answer"]) if n % 2 == 0 else json.dumps(BAD_SCHEMA[n % 7](t["answer"]))
        rows.append((row(t["text"], None, t["phrasing"], raw_answer=raw), "invalid_output", t, None))
    for n in range(PLANT["too_short"]):
        t = mk.clean()
        rows.append((row(SHORT[n % len(SHORT)], {**t["answer"], "category": "other", "product": "none"}, "short"), "too_short", dict(t, pii=None), None))
    for n in range(PLANT["too_long"]):
        t = mk.clean()
        log = "\n".join(rng.choice(LOG) + f" (attempt {a})" for a in range(1, rng.randint(160, 220)))
        rows.append((row(t["text"] + "\n\nHere is the full log from the app:\n" + log, t["answer"], t["phrasing"]), "too_long", t, None))
    order = list(range(len(rows))); rng.shuffle(order)
    rows = [rows[i] for i in order]
    line_of_clean = {base: n for n, (_, kind, _, base) in enumerate(rows, 1) if kind == "clean"}
    planted = {k: [] for k in ("exact_duplicates", "near_duplicates", "label_conflicts", "leakage", "empty_output", "invalid_output",
                               "too_short", "too_long", "pii")}
    for n, (r, kind, t, base) in enumerate(rows, 1):
        if kind in ("exact_duplicates", "near_duplicates", "label_conflicts", "leakage"): planted[kind].append([line_of_clean[base], n])
        elif kind != "clean": planted[kind].append(n)
        if t["pii"]: planted["pii"].append(n)
        assert bool(find_pii(r["messages"][1]["content"])) == bool(t["pii"]), f"line {n}: PII detection disagrees with the plan"
    counts = {k: len(v) for k, v in planted.items()}
    counts["label_conflicts"] *= 2  # both rows of each conflicting pair are quarantined
    manifest = {"seed": seed, "rows": len(rows), "clean_generated": N_CLEAN, "hand_written": len(B.HARD_CASES),
                "counts": counts, "planted": planted,
                "definitions": {
                    "exact_duplicates": "[original line, copy line]: a verbatim copy (some with trailing whitespace); whichever comes later is the duplicate",
                    "near_duplicates": f"[original line, variant line]: a typo, doubled spaces, other casing or punctuation; prompt Jaccard >= {NEAR_MIN}",
                    "empty_output": "lines whose assistant answer is empty or whitespace",
                    "invalid_output": "lines whose answer is not valid JSON (cut off, single quotes, prose or a Markdown fence around it, trailing comma) or violates the schema (missing/extra key, value outside the enum, empty product, too-short summary)",
                    "label_conflicts": "[original line, copy line]: the same prompt with another category; both rows count",
                    "too_short": "lines whose prompt has 1-3 tokens",
                    "too_long": "lines with a pasted log, far over 512 tokens",
                    "leakage": f"[original line, follow-up line]: a follow-up repeating an earlier ticket (prompt Jaccard {FOLLOWUP_RANGE[0]}-{FOLLOWUP_RANGE[1]}); kept, but must share its original's split",
                    "pii": "lines whose ticket holds an e-mail address, a phone number or a Luhn-valid card number (flagged, not removed)",
                }}
    raw = [r for r, *_ in rows]
    prefs = preference_pairs(random.Random(seed + 2), [t for t in clean])
    return raw, prefs, manifest


def preference_pairs(rng, clean):
    "One (prompt, chosen, rejected) pair per clean ticket; rejected answers are realistic failures, four kinds in turn."
    products = [p["name"] for p in B.PRODUCTS]
    out = []
    for n, t in enumerate(clean):
        a = t["answer"]; kind = ("wrong_category", "invalid_json", "chatty_prose", "wrong_product")[n % 4]
        if kind == "wrong_category": bad = json.dumps({**a, "category": rng.choice([c for c in B.CATEGORIES if c != a["category"]])})
        elif kind == "invalid_json": bad = rng.choice(BAD_JSON)(a)
        elif kind == "chatty_prose":
            bad = (f"Thanks for reaching out! It sounds like this is about {a['category']}"
                   f"{'' if a['product'] == 'none' else ' and your ' + a['product']}. I'd say the priority is {a['priority']}. "
                   f"{a['summary']} Let me know if there's anything else I can help with!")
        else:
            wrong = rng.choice([p for p in products if p.lower() not in t["text"].lower() and p != a["product"]])
            bad = json.dumps({**a, "product": wrong})
        out.append({"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": t["text"]}],
                    "chosen": [{"role": "assistant", "content": json.dumps(a, ensure_ascii=False)}],
                    "rejected": [{"role": "assistant", "content": bad}],
                    "meta": {"phrasing": t["phrasing"], "rejection": kind}})
    return out


def dump_jsonl(rows): return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main():
    raw, prefs, manifest = build()
    files = {"tickets_raw.jsonl": dump_jsonl(raw), "tickets_prefs.jsonl": dump_jsonl(prefs),
             "tickets_manifest.json": json.dumps(manifest, indent=1) + "\n"}
    if "--check" in sys.argv:
        stale = [n for n, text in files.items() if not (HERE / n).exists() or (HERE / n).read_text() != text]
        sys.exit(f"out of date: {', '.join(stale)} (run python data/make_tickets.py)" if stale else 0)
    for n, text in files.items():
        tmp = HERE / f".{n}.tmp"; tmp.write_text(text); tmp.replace(HERE / n)
    print(f"{manifest['rows']} raw rows, {len(prefs)} preference pairs; planted: {manifest['counts']}")


if __name__ == "__main__":
    main()
