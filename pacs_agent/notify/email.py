"""E-mail alerts over SMTP: STARTTLS (587) or implicit TLS (465), with a password from a file or
the environment; the server's certificate is verified (against ``ca_file`` when given)."""

from __future__ import annotations

import os
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from pacs_agent.notify.channels import SendOutcome
from pacs_agent.notify.message import AlertMessage
from pacs_agent.settings import NotificationTarget


class EmailChannel:
    def __init__(self, target: NotificationTarget) -> None:
        self.target = target

    def _password(self) -> str | None:
        t = self.target
        if t.smtp_password_file:
            return Path(t.smtp_password_file).read_text(encoding="utf-8").strip()
        if t.smtp_password_env:
            value = os.environ.get(t.smtp_password_env)
            if value is None:
                raise OSError(f"environment variable {t.smtp_password_env} is not set")
            return value
        return None

    def compose(self, message: AlertMessage) -> EmailMessage:
        mail = EmailMessage()
        mail["Subject"] = message.title
        mail["From"] = self.target.from_address
        mail["To"] = ", ".join(self.target.to)
        mail["Date"] = formatdate(localtime=False)
        mail["Message-ID"] = make_msgid(domain=self.target.from_address.rpartition("@")[2] or None)
        mail["X-PE-Agent-Notification"] = str(message.notification_id)
        mail["X-Priority"] = "1" if message.flag.value == "CRITICAL" else "2"
        mail.set_content("\n\n".join(message.text_lines()) + "\n")
        return mail

    def send(self, message: AlertMessage) -> SendOutcome:
        t = self.target
        try:
            password = self._password()
        except OSError as exc:
            return SendOutcome(False, None, f"SMTP password not available: {exc}", retryable=False)
        try:
            context = ssl.create_default_context(cafile=t.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            return SendOutcome(False, None, f"ca_file {t.ca_file} cannot be used: {exc}", retryable=False)
        smtp: smtplib.SMTP | None = None
        try:
            if t.smtp_security == "tls":
                smtp = smtplib.SMTP_SSL(t.smtp_host, t.smtp_port, timeout=t.timeout_seconds, context=context)
            else:
                smtp = smtplib.SMTP(t.smtp_host, t.smtp_port, timeout=t.timeout_seconds)
                smtp.ehlo()
                if t.smtp_security == "starttls":
                    smtp.starttls(context=context)
                    smtp.ehlo()
            if t.smtp_username:
                smtp.login(t.smtp_username, password or "")
            refused = smtp.send_message(self.compose(message))
            detail = "SMTP 250 accepted"
            if refused:
                detail += "; refused: " + ", ".join(f"{addr} ({code})" for addr, (code, _) in sorted(refused.items()))
            return SendOutcome(True, 250, detail, retryable=False)
        except smtplib.SMTPNotSupportedError as exc:
            return SendOutcome(False, None, f"SMTP server {t.smtp_host} does not offer it: {exc}", retryable=False)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            return SendOutcome(False, max(codes) if codes else None, f"every recipient refused: {exc.recipients}",
                               retryable=any(400 <= c < 500 for c in codes))
        except smtplib.SMTPResponseException as exc:
            text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
            return SendOutcome(False, exc.smtp_code, f"SMTP {exc.smtp_code} {text}", retryable=400 <= exc.smtp_code < 500)
        except ssl.SSLCertVerificationError as exc:
            return SendOutcome(False, None, f"SMTP server certificate not trusted: {exc.verify_message}", retryable=False)
        except (smtplib.SMTPException, OSError) as exc:
            return SendOutcome(False, None, f"SMTP to {t.smtp_host}:{t.smtp_port} failed: {type(exc).__name__}: {exc}", retryable=True)
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    smtp.close()
