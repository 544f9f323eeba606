"""Read and validate campaigns/, templates/ and policies/ into one versioned DefinitionSet.

A set is all or nothing: `load_definitions` either returns a complete, compiled set or
raises `SourceErrors` listing every problem as `file:line: message`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

from engine.core import cel_context, domain, policy, policy_tests, render
from engine.core.lint import LintReport
from engine.defcontent import load_campaigns, load_templates
from engine.defmodels import (
    DataFile,
    PolicyFile,
    ProgramFile,
    PurposesFile,
    RetentionFile,
    RuleModel,
    VariableModel,
)
from engine.defsource import Collector, SourceFile, content_hash, read_tree
from engine.yamlsource import SourceError, SourceErrors

RETENTION_FILE = "policies/retention.yaml"
SPECIAL_POLICY_FILES = {"purposes.yaml", "data.yaml", "program.yaml", "retention.yaml"}


@dataclass(frozen=True)
class PolicyDef:
    id: str
    description: str
    file: str
    version: str
    rules: tuple[domain.Rule, ...]
    tests: tuple[policy_tests.PolicyTest, ...]
    field_lines: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def line_for(self, rule: domain.Rule, message: str) -> int:
        """The line of the rule's field that an error message is about."""
        for name in ("applies_to.where", "when"):
            if f"{name}:" in message:
                return self.field_lines.get((rule.id, name), rule.line)
        return rule.line


@dataclass(frozen=True)
class Program:
    name: str
    support_contact: str
    default_locale: str
    texts: Mapping[str, Mapping[str, str]]

    def text(self, which: str, locale: str) -> str:
        return self.texts.get(locale_language(locale), self.texts[self.default_locale])[which]


@dataclass(frozen=True)
class DefinitionSet:
    """Everything loaded from the folders, compiled and versioned by content hash."""

    root: str
    version: str
    purposes: Mapping[str, str]
    purpose_categories: Mapping[str, str]
    variables: Mapping[str, domain.Variable]
    patient_attributes: Mapping[str, domain.Variable]
    program: Program
    policies: tuple[PolicyDef, ...]
    policy_set: policy.CompiledPolicySet
    templates: Mapping[tuple[str, str], domain.Template]
    compiled_templates: Mapping[tuple[str, str], render.CompiledTemplate]
    lint: Mapping[tuple[str, str], LintReport]
    campaigns: Mapping[str, domain.Campaign]
    audiences: Mapping[str, cel_context.CompiledExpression | None]
    files: tuple[SourceFile, ...] = field(default=())
    # policies/retention.yaml; None for a set without one (nothing is purged then).
    retention: RetentionFile | None = None

    @cached_property
    def policy_version(self) -> str:
        return content_hash("".join(p.version for p in self.policies))

    def template_for(self, template_id: str, locale: str) -> domain.Template:
        """The locale variant: exact, then the language alone, then the default locale."""
        for candidate in (locale, locale_language(locale), self.program.default_locale):
            found = self.templates.get((template_id, candidate))
            if found is not None:
                return found
        raise KeyError(f"no template {template_id!r}")

    def template_locales(self, template_id: str) -> list[str]:
        return sorted(loc for tid, loc in self.templates if tid == template_id)

    def template_contains_phi(self, template: domain.Template) -> bool:
        return bool(self.lint[(template.id, template.locale)].phi_variables)


@cache  # a handful of locales, asked for several times per message planned
def locale_language(locale: str) -> str:
    return locale.split("-")[0].split("_")[0].lower()


def load_definitions(root: Path | str) -> DefinitionSet:
    """Load, validate and compile every definition under `root`, or raise SourceErrors."""
    return load_sources(read_tree(Path(root)), root=str(root))


def load_sources(sources: dict[str, str], *, root: str = "") -> DefinitionSet:
    """Build a DefinitionSet from {relative path: text} (a folder, or a set stored in the DB)."""
    c = Collector(sources)
    purposes_file, _ = c.yaml_model("policies/purposes.yaml", PurposesFile, "purposes")
    data_file, _ = c.yaml_model("policies/data.yaml", DataFile, "data")
    program_file, _ = c.yaml_model("policies/program.yaml", ProgramFile, "program")
    retention = None
    if RETENTION_FILE in sources:  # optional: sets stored before it existed still load
        retention, _ = c.yaml_model(RETENTION_FILE, RetentionFile, "retention")
    if c.errors or purposes_file is None or data_file is None or program_file is None:
        raise SourceErrors(c.errors)
    purposes = list(purposes_file.purposes)
    variables = _variables(data_file.variables)
    policies = _load_policies(c, purposes)
    policy_set = _compile_policy_set(c, policies, purposes)
    rules = [r for p in policies for r in p.rules]
    templates, compiled, lint = load_templates(
        c, set(purposes), variables, lambda purpose: opt_out_required(rules, purpose)
    )
    campaigns, audiences = load_campaigns(c, set(purposes), templates)
    if c.errors or policy_set is None:
        raise SourceErrors(c.errors)
    files = tuple(sorted(c.files, key=lambda f: f.path))
    return DefinitionSet(
        root=root,
        version=content_hash("".join(f"{f.path}:{f.version}\n" for f in files)),
        purposes={k: v.description for k, v in purposes_file.purposes.items()},
        purpose_categories={k: v.category for k, v in purposes_file.purposes.items()},
        variables=variables,
        patient_attributes=_variables(data_file.patient_attributes),
        program=Program(
            name=program_file.name,
            support_contact=program_file.support_contact,
            default_locale=program_file.default_locale,
            texts={loc: t.model_dump() for loc, t in program_file.texts.items()},
        ),
        policies=tuple(policies),
        policy_set=policy_set,
        templates=templates,
        compiled_templates=compiled,
        lint=lint,
        campaigns=campaigns,
        audiences=audiences,
        files=files,
        retention=retention,
    )


def _variables(models: Mapping[str, VariableModel]) -> dict[str, domain.Variable]:
    return {
        name: domain.Variable(name, v.classification, v.description, v.max_length, v.example)
        for name, v in models.items()
    }


def opt_out_required(rules: Sequence[domain.Rule], purpose: str) -> bool:
    """Whether a rule denies messages of this purpose that carry no opt-out text."""
    for rule in rules:
        applies = rule.applies_to.purposes is None or purpose in rule.applies_to.purposes
        if applies and rule.when and "!message.has_opt_out_text" in rule.when.replace(" ", ""):
            return True
    return False


def _to_rule(model: RuleModel, *, policy_id: str, line: int) -> domain.Rule:
    window_start = window_end = None
    window = None
    if isinstance(model.window, dict):
        window_start, window_end = model.window["start"], model.window["end"]
    else:
        window = model.window
    return domain.Rule(
        id=model.id,
        kind=model.kind,
        effect=model.effect,
        policy=policy_id,
        description=model.description,
        cite=model.cite,
        message=model.message,
        applies_to=domain.AppliesTo(
            purposes=tuple(model.applies_to.purposes) if model.applies_to.purposes else None,
            where=model.applies_to.where,
        ),
        legal_bases=tuple(model.legal_bases),
        window_start=window_start,
        window_end=window_end,
        limit=model.limit,
        window=window,
        count_purposes=tuple(model.count_purposes) if model.count_purposes else None,
        when=model.when,
        line=line,
    )


def _load_policies(c: Collector, purposes: list[str]) -> list[PolicyDef]:
    result = []
    for rel in c.paths("policies", ".yaml"):
        if rel.rsplit("/", 1)[-1] in SPECIAL_POLICY_FILES:
            continue
        parsed, doc = c.yaml_model(rel, PolicyFile, "policy")
        if parsed is None or doc is None:
            continue
        rules = tuple(
            _to_rule(r, policy_id=parsed.id, line=doc.line_of(("rules", i)))
            for i, r in enumerate(parsed.rules)
        )
        tests = tuple(
            policy_tests.policy_test_from_mapping(t.model_dump(), line=doc.line_of(("tests", i)))
            for i, t in enumerate(parsed.tests)
        )
        field_lines = {
            (r.id, name): doc.line_of(("rules", i, *name.split(".")))
            for i, r in enumerate(parsed.rules)
            for name in ("applies_to.where", "when")
        }
        version = content_hash(c.sources[rel])
        result.append(
            PolicyDef(parsed.id, parsed.description, doc.file, version, rules, tests, field_lines)
        )
    seen: dict[str, str] = {}
    for p in result:
        if p.id in seen:
            c.errors.append(SourceError(p.file, 1, f"policy id {p.id!r} also used in {seen[p.id]}"))
        seen[p.id] = p.file
    return result


def _compile_policy_set(
    c: Collector, policies: list[PolicyDef], purposes: list[str]
) -> policy.CompiledPolicySet | None:
    """Compile rule by rule so that every broken rule is reported, then the whole set."""
    seen: dict[str, str] = {}
    failed = False
    for pol in policies:
        for rule in pol.rules:
            if rule.id in seen:
                message = f"rule id {rule.id!r} is also used in {seen[rule.id]}"
                c.errors.append(SourceError(pol.file, rule.line, message))
                failed = True
            seen[rule.id] = pol.file
            try:
                policy.compile_policy_set([rule], purposes=purposes)
            except policy.PolicyError as exc:
                c.errors.append(SourceError(pol.file, pol.line_for(rule, exc.message), exc.message))
                failed = True
    if failed:
        return None
    return policy.compile_policy_set([r for p in policies for r in p.rules], purposes=purposes)
