// The Accounts business: opens an account per saga and closes it when the saga is compensated.

package main

import (
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
)

const accountsSchema = `
CREATE TABLE IF NOT EXISTS accounts (
    id                 TEXT PRIMARY KEY,
    saga_id            TEXT NOT NULL,
    execute_request_id TEXT NOT NULL UNIQUE,
    owner              TEXT NOT NULL,
    currency           TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    opened_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    closed_at          TEXT
) STRICT`

// The currencies Accounts keeps accounts in; any other is a business "no".
var currencies = map[string]bool{"EUR": true, "USD": true, "GBP": true, "CHF": true}

const defaultCurrency = "EUR"

// OpenAccountInput is what OpenAccount reads from the saga's input (a JSON object).
type OpenAccountInput struct {
	// Currency of the account; EUR when absent.
	Currency string `json:"currency"`
}

// Account is OpenAccount's output: stored by the coordinator, shown to later steps and to
// CloseAccount.
type Account struct {
	AccountID string `json:"account_id"`
	Owner     string `json:"owner"`
	Currency  string `json:"currency"`
	IBAN      string `json:"iban"`
}

// openAccount decides and writes one account on tx; the owner is the user that the
// create-user step made.
func openAccount(tx *sql.Tx, sagaID, requestID string, input OpenAccountInput, owner string) ([]byte, error) {
	if owner == "" {
		return nil, &Refusal{
			Reason:  "OWNER_MISSING",
			Message: "no create-user output with a user_id: an account needs an owner",
		}
	}
	currency := strings.ToUpper(input.Currency)
	if currency == "" {
		currency = defaultCurrency
	}
	if !currencies[currency] {
		return nil, &Refusal{
			Reason:  "CURRENCY_NOT_SUPPORTED",
			Message: fmt.Sprintf("accounts are kept in EUR, USD, GBP or CHF, not %q", input.Currency),
		}
	}
	suffix, err := randomHex(5)
	if err != nil {
		return nil, err
	}
	account := Account{
		AccountID: "acc_" + suffix,
		Owner:     owner,
		Currency:  currency,
		IBAN:      "DE89 3704 " + strings.ToUpper(suffix[:8]),
	}
	if _, err := tx.Exec(
		`INSERT INTO accounts (id, saga_id, execute_request_id, owner, currency, status)
		 VALUES (?, ?, ?, ?, ?, 'open')`,
		account.AccountID, sagaID, requestID, owner, currency,
	); err != nil {
		return nil, err
	}
	return json.Marshal(account)
}

// closeAccount closes the account that the Execute request executeRequestID opened. It is keyed
// by that request_id, not by the Execute's output: the coordinator may never have received the
// output (a timeout) although the account was opened here.
func closeAccount(tx *sql.Tx, executeRequestID string) error {
	_, err := tx.Exec(
		`UPDATE accounts SET status = 'closed', closed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
		 WHERE execute_request_id = ? AND status = 'open'`,
		executeRequestID,
	)
	return err
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
