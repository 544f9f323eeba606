"""Loading templates/ and campaigns/ into domain objects, compiled and linted."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from engine.core import cel_context, domain, render
from engine.core.lint import LintReport, lint
from engine.defmodels import CampaignFile, TemplateFront
from engine.defsource import Collector, SourceFile, content_hash, split_front_matter
from engine.yamlsource import SourceError, SourceErrors, parse_yaml


def load_templates(
    c: Collector,
    purposes: set[str],
    variables: Mapping[str, domain.Variable],
    opt_out_required: Callable[[str], bool],
) -> tuple[
    dict[tuple[str, str], domain.Template],
    dict[tuple[str, str], render.CompiledTemplate],
    dict[tuple[str, str], LintReport],
]:
    """Parse, compile and lint every template; lint errors are load errors."""
    templates: dict[tuple[str, str], domain.Template] = {}
    compiled: dict[tuple[str, str], render.CompiledTemplate] = {}
    reports: dict[tuple[str, str], LintReport] = {}
    for rel in c.paths("templates", ".sms.j2"):
        text = c.sources[rel]
        template = _parse_template(c, rel, text, rel.rsplit("/", 1)[-1], purposes)
        if template is None:
            continue
        key = (template.id, template.locale)
        if key in templates:
            c.errors.append(
                SourceError(
                    rel,
                    2,
                    f"template {template.id}.{template.locale} "
                    f"is also defined in {templates[key].file}",
                )
            )
            continue
        report = lint(template, variables, opt_out_required=opt_out_required(template.purpose))
        if report.errors:
            c.errors.extend(SourceError(rel, i.line, i.message) for i in report.errors)
            continue
        try:
            compiled[key] = render.compile_template(template)
        except render.TemplateError as exc:
            c.errors.append(SourceError(rel, exc.line, exc.message))
            continue
        templates[key] = template
        reports[key] = report
        c.files.append(
            SourceFile(rel, "template", f"{template.id}.{template.locale}", template.version, text)
        )
    return templates, compiled, reports


def _parse_template(
    c: Collector, rel: str, text: str, name: str, purposes: set[str]
) -> domain.Template | None:
    split = split_front_matter(text)
    if split is None:
        c.errors.append(SourceError(rel, 1, "a template starts with a '---' front matter block"))
        return None
    front_text, body, body_line = split
    try:
        doc = parse_yaml(front_text, rel, first_line=2)
    except SourceErrors as exc:
        c.errors.extend(exc.errors)
        return None
    front = c.model(TemplateFront, doc)
    if front is None:
        return None
    expected = f"{front.id}.{front.locale}.sms.j2"
    if name != expected:
        c.errors.append(
            SourceError(
                rel,
                2,
                f"file name must be {expected} for id {front.id!r} and locale {front.locale!r}",
            )
        )
        return None
    if front.purpose not in purposes:
        c.errors.append(
            SourceError(rel, doc.line_of(("purpose",)), f"unknown purpose {front.purpose!r}")
        )
        return None
    return domain.Template(
        id=front.id,
        purpose=front.purpose,
        locale=front.locale,
        body=body,
        version=content_hash(text),
        description=front.description,
        file=rel,
        body_line=body_line,
    )


def load_campaigns(
    c: Collector,
    purposes: set[str],
    templates: Mapping[tuple[str, str], domain.Template],
) -> tuple[dict[str, domain.Campaign], dict[str, cel_context.CompiledExpression | None]]:
    campaigns: dict[str, domain.Campaign] = {}
    audiences: dict[str, cel_context.CompiledExpression | None] = {}
    for rel in c.paths("campaigns", ".yaml"):
        parsed, doc = c.yaml_model(rel, CampaignFile, "campaign")
        if parsed is None or doc is None:
            continue
        problems = _campaign_problems(parsed, rel, purposes, templates)
        for key, message in problems:
            c.errors.append(SourceError(doc.file, doc.line_of(key), message))
        audience = None
        if parsed.audience.where:
            try:
                audience = cel_context.compile_expression(
                    parsed.audience.where, names=cel_context.AUDIENCE_NAMES, where="audience.where"
                )
            except cel_context.PolicyError as exc:
                line = doc.line_of(("audience", "where"))
                c.errors.append(SourceError(doc.file, line, f"audience.where: {exc.message}"))
                continue
        if problems:
            continue
        campaigns[parsed.id] = _to_campaign(parsed, doc.file, content_hash(c.sources[rel]))
        audiences[parsed.id] = audience
    return campaigns, audiences


def _campaign_problems(
    parsed: CampaignFile,
    rel: str,
    purposes: set[str],
    templates: Mapping[tuple[str, str], domain.Template],
) -> list[tuple[tuple[str, ...], str]]:
    problems: list[tuple[tuple[str, ...], str]] = []
    if rel.rsplit("/", 1)[-1] != f"{parsed.id}.yaml":
        problems.append((("id",), f"file name must be {parsed.id}.yaml"))
    if parsed.purpose not in purposes:
        problems.append((("purpose",), f"unknown purpose {parsed.purpose!r}"))
    problems += _template_problems(("template",), parsed.template, parsed.purpose, templates)
    if parsed.link is not None and parsed.link.confirmation is not None:
        field = ("link", "confirmation")
        problems += _template_problems(field, parsed.link.confirmation, parsed.purpose, templates)
    return problems


def _template_problems(
    field: tuple[str, ...],
    template_id: str,
    purpose: str,
    templates: Mapping[tuple[str, str], domain.Template],
) -> list[tuple[tuple[str, ...], str]]:
    variants = [t for (tid, _), t in templates.items() if tid == template_id]
    if not variants:
        return [(field, f"unknown template {template_id!r}")]
    return [
        (field, f"template {t.file} has purpose {t.purpose!r}, campaign has {purpose!r}")
        for t in variants
        if t.purpose != purpose
    ]


def _to_campaign(parsed: CampaignFile, file: str, version: str) -> domain.Campaign:
    s = parsed.schedule
    schedule = domain.Schedule(
        kind=s.kind,  # type: ignore[arg-type]
        at=s.at,
        relative_to=s.relative_to,
        offsets=tuple(int(o.total_seconds() // 86400) for o in s.offsets),
        every=s.every,
        start=s.start,
        count=s.count,
        on=s.on,
    )
    link = (
        domain.LinkSettings(parsed.link.kind, parsed.link.expires_after, parsed.link.confirmation)
        if parsed.link
        else None
    )
    return domain.Campaign(
        id=parsed.id,
        name=parsed.name,
        purpose=parsed.purpose,
        template=parsed.template,
        anchor=parsed.audience.anchor,
        where=parsed.audience.where,
        schedule=schedule,
        expires_after=parsed.expires_after,
        version=version,
        link=link,
        status=parsed.status,
        file=file,
    )
