package main

import (
	"context"
	"errors"
	"log/slog"
)

func runThroughput(ctx context.Context, log *slog.Logger, args []string) error {
	return errors.New("not yet")
}
