"""The errors a user can act on: entry points print their one-line message instead of a traceback."""
from data_loader.safe_pickle import DataFileError
from model.model import ModelError
from parse_config import ConfigError
from utils.checkpoint import CheckpointError
from utils.experiment import ObserverError
from utils.inference import InferenceError

USER_ERRORS = (ConfigError, DataFileError, CheckpointError, ModelError, ObserverError, InferenceError)
